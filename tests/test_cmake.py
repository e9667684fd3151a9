"""CMakeLists.txt builds the same csrc/ as setup.py into a library that torch.ops.load_library can use, so the two
builds cannot drift. Needs cmake and a C++ compiler; about 10 s on 2 cores."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake"),
    pytest.mark.skipif(not (REPO / "CMakeLists.txt").is_file(), reason="needs the source tree"),
]

CHECK = """
import torch
torch.ops.load_library({lib!r})
import skelemix  # SKELEMIX_DISABLE_EXT=1: only the reference, no second registration of the ops
from skelemix import reference
assert "torch=" + torch.__version__ in torch.ops.skelemix._build_info()
x, m = torch.randn(6, 4, 8, 5, dtype=torch.float64), torch.rand(3, 8, 5) < 0.5
torch.testing.assert_close(torch.ops.skelemix.mask_pool(x, m), reference.mask_pool(x, m))
g = torch.randn(6, 2, 4, dtype=torch.float64)
xr = x.clone().requires_grad_()
reference.mask_pool(xr, m).backward(g)
torch.testing.assert_close(torch.ops.skelemix._mask_pool_backward(g, m), xr.grad)
x5, p, j = torch.randn(4, 3, 10, 5, 2), torch.randint(0, 4, (2, 4)), torch.rand(2, 1, 5) < 0.5
s = torch.tensor([[[0, 2]], [[1, 3]]])
for a, b in zip(torch.ops.skelemix.skelemix_gather(x5, p, j, s, 4), reference.skelemix_gather(x5, p, j, s, 4)):
    assert torch.equal(a, b)
print("ok")
"""


def test_cmake_build_loads_and_matches_reference(tmp_path):
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), *generator, f"-DPython3_EXECUTABLE={sys.executable}",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True, timeout=300)
    res = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert (build / "compile_commands.json").is_file()
    lib = build / "libskelemix_ops.so"
    res = subprocess.run([sys.executable, "-c", CHECK.format(lib=str(lib))], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "SKELEMIX_DISABLE_EXT": "1"}, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
