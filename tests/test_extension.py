"""The compiled extension: what it reports, what it registers, and life without it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import skelemix
from skelemix import _extension

REPO = Path(__file__).resolve().parents[1]


def run_python(code, tmp_path, **env):
    """Run ``code`` in a fresh interpreter outside the repository (so the cwd cannot shadow what is installed)."""
    full_env = {k: v for k, v in os.environ.items() if k != "SKELEMIX_DISABLE_EXT"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=full_env, capture_output=True, text=True,
                          timeout=300)


def test_ci_requires_cpp():
    """CI sets SKELEMIX_REQUIRE_CPP=1 so that a silently missing extension fails instead of skipping."""
    if os.environ.get("SKELEMIX_REQUIRE_CPP") != "1":
        pytest.skip("SKELEMIX_REQUIRE_CPP is not set")
    assert _extension.HAS_CPP, f"SKELEMIX_REQUIRE_CPP=1 but the C++ ops are not usable: {_extension.LOAD_ERROR}"


def test_ci_requires_cuda_build():
    """Without it a CUDA build that failed to load would skip every impl='cuda' test. No device marker: CI's
    CUDA-build stage (no GPU) runs it too; bench/device_check.sh selects it by its node ID, first."""
    if os.environ.get("SKELEMIX_REQUIRE_CUDA_BUILD") != "1":
        pytest.skip("SKELEMIX_REQUIRE_CUDA_BUILD is not set")
    assert _extension.HAS_CUDA_KERNELS, (
        f"SKELEMIX_REQUIRE_CUDA_BUILD=1 but the CUDA kernels were not compiled: {_extension.available('cuda')[1]}")
    if torch.cuda.is_available():  # on a GPU the kernels must also be usable
        assert _extension.available("cuda") == (True, ""), _extension.available("cuda")[1]


def test_build_info_is_sane():
    info = _extension.build_info()
    assert info["torch"] == torch.__version__
    assert info["cpp"] is _extension.HAS_CPP and info["cuda_kernels"] is _extension.HAS_CUDA_KERNELS
    if info["cpp"]:
        assert info["load_error"] is None
        assert info["built_torch"] == torch.__version__
    else:
        assert info["load_error"], "a missing extension must say why"
        assert not info["cuda_kernels"]
    if info["cuda_kernels"]:
        assert info["cuda_version"] and info["cuda_arch"], info
    assert _extension.available("eager") == (True, "")
    for name in ("cpp", "cuda", "triton"):
        ok, why = _extension.available(name)
        assert ok or why, f"{name} unavailable without a reason"
    with pytest.raises(ValueError, match="unknown implementation"):
        _extension.available("fortran")


@pytest.mark.skipif(not _extension.HAS_CPP, reason="C++ ops not loaded")
def test_registered_dispatch_keys():
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in ("skelemix::mask_pool", "skelemix::_mask_pool_backward", "skelemix::skelemix_gather"):
        assert has_kernel(op, "CPU")
        # A CPU-only build must register no CUDA kernel (and a CUDA build must).
        assert has_kernel(op, "CUDA") == _extension.HAS_CUDA_KERNELS


def test_info_cli(tmp_path):
    res = subprocess.run([sys.executable, "-m", "skelemix.info"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for key in ("python:", "torch:", "numpy:", "skelemix:", "C++ ops (skelemix._C):", "CUDA ops:", "triton:",
                "impl=auto picks for CPU tensors:", "impl=auto picks for CUDA tensors:"):
        assert key in out, f"{key!r} missing from:\n{out}"
    assert f"impl=auto picks for CPU tensors: {'cpp' if _extension.HAS_CPP else 'eager'}" in out


def test_info_main_in_process(capsys):
    from skelemix.info import main

    assert main([]) == 0
    assert "C++ ops" in capsys.readouterr().out


def test_kernels_installed_inside_the_package(tmp_path):
    code = (
        "import importlib.util, pathlib, skelemix.kernels\n"
        "print(pathlib.Path(skelemix.kernels.__file__).resolve().parent)\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else None)\n"
    )
    res = run_python(code, tmp_path)
    assert res.returncode == 0, res.stderr
    ours, top_level = res.stdout.splitlines()
    # `import kernels` must not find our folder (PyPI's `kernels` may legitimately be installed). It would if
    # the install put the repository root on sys.path (or PYTHONPATH does).
    assert top_level == "None" or Path(top_level).resolve().parent != Path(ours), (
        f"top-level `kernels` resolves to skelemix's Triton kernels at {top_level}")


@pytest.mark.needs_triton
def test_triton_kernels_compile_for_hopper():
    """Every Triton kernel (all forward autotune configs) compiles to an sm_90 cubin, GPU or not: catches what the
    interpreter does not check (layouts of tl.reshape/tl.dot, shared memory, register spills are not run)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_compile_check.py")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "FAILED" not in res.stdout, res.stdout + res.stderr
    assert res.stdout.count("ok ") >= 3 * 8, res.stdout  # 8 kernels x 3 dtypes at least


def test_import_and_eager_without_extension(tmp_path):
    code = (
        "import torch, skelemix\n"
        "from skelemix import _extension, reference\n"
        "from skelemix.ops import mask_pool\n"
        "assert not _extension.HAS_CPP and 'SKELEMIX_DISABLE_EXT' in _extension.LOAD_ERROR\n"
        "x, m = torch.randn(4, 3, 5, 6), torch.rand(2, 5, 6) < 0.5\n"
        "torch.testing.assert_close(mask_pool(x, m), reference.mask_pool(x, m))\n"
        "try:\n"
        "    mask_pool(x, m, impl='cpp')\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    res = run_python(code, tmp_path, SKELEMIX_DISABLE_EXT="1")
    assert res.returncode == 0, res.stderr
    assert "impl='cpp' is not available on this install" in res.stdout, res.stdout
    assert "SKELEMIX_DISABLE_EXT" in res.stdout
    assert "Warning" not in res.stderr, "a deliberately missing extension must not warn"


def test_info_without_extension(tmp_path):
    res = subprocess.run([sys.executable, "-m", "skelemix.info"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "SKELEMIX_DISABLE_EXT": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "C++ ops (skelemix._C): no (skelemix._C is disabled by SKELEMIX_DISABLE_EXT=1" in res.stdout
    assert "impl=auto picks for CPU tensors: eager" in res.stdout


def test_package_version():
    assert skelemix.__version__ == "0.1.0"
