"""Self-checking impl="auto" (skelemix/selfcheck.py) and ``python -m skelemix.info --check``.

On the CPU the machinery runs against the C++ ops with "cpu" added to the probed device types (``probed``):
the pass path, the disk cache, a deliberately wrong or crashing implementation (one warning, fall-through to
eager, nothing cached), explicit impls unprobed, RNG states untouched, no probe inside a torch.compile trace.
The ``needs_cuda`` test probes the real CUDA and Triton kernels (bench/device_check.sh runs it first).
"""
import importlib
import json
import random
import re
import warnings

import numpy as np
import pytest
import torch

from skelemix import _extension, info, ops, reference, selfcheck
from skelemix.ops import _impl

CPU = torch.device("cpu")


def implementations(op):
    return importlib.import_module(f"skelemix.ops.{op}")._IMPLEMENTATIONS


@pytest.fixture
def probed(monkeypatch, tmp_path):
    """Probe the CPU kernels too, with a fresh cache folder and no decisions yet; count the probes run."""
    monkeypatch.setattr(selfcheck, "PROBED_DEVICE_TYPES", {"cpu", "cuda"})
    monkeypatch.setenv(selfcheck.CACHE_ENV, str(tmp_path / "cache"))
    selfcheck.forget()
    calls = []
    real_probe = selfcheck.probe

    def counting_probe(op, fn, device, dtype):
        calls.append((op, dtype))
        return real_probe(op, fn, device, dtype)

    monkeypatch.setattr(selfcheck, "probe", counting_probe)
    yield calls
    selfcheck.forget()


def cache_files(tmp_path):
    folder = tmp_path / "cache" / "selfcheck"
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def mask_pool_args():
    return torch.randn(4, 8, 4, 25), torch.rand(2, 4, 25) < 0.5


def wrong_graph_conv(x, weight, bias, A):
    return reference.graph_conv(x, weight, bias, A) * 1.01  # 1% off: far outside float32's tolerance


# ------------------------------------------------------------------------------------------------ the probes


@pytest.mark.needs_impl("cpp")
@pytest.mark.parametrize("dtype", info.DTYPES, ids=str)
@pytest.mark.parametrize("op", selfcheck.OPS)
def test_cpp_ops_pass_their_probes_quickly(op, dtype):
    outcome = selfcheck.probe(op, implementations(op)["cpp"], "cpu", dtype)
    assert outcome.ok, outcome.error
    # Timed a second time: a process's first call pays one-time library set-up (about 1 s for the first
    # einsum here), which the op's first real call would pay anyway.
    outcome = selfcheck.probe(op, implementations(op)["cpp"], "cpu", dtype)
    assert outcome.seconds < 0.5, f"{op} {dtype}: the probe took {outcome.seconds:.2f} s"


@pytest.mark.parametrize("op", selfcheck.OPS)
def test_a_wrong_or_crashing_implementation_fails_its_probe(op):
    def off(*args):
        out = reference.skelemix_gather(*args[:5]) if op == "skelemix_gather" else getattr(reference, op)(*args)
        outs = list(out) if isinstance(out, tuple) else [out]
        outs[0] = outs[0].clone()
        outs[0].view(-1)[1] += 1  # one element, by one: any kernel bug at least as visible
        return tuple(outs) if isinstance(out, tuple) else outs[0]

    outcome = selfcheck.probe(op, off, "cpu", torch.float32)
    assert not outcome.ok and "output 0" in outcome.error, outcome
    outcome = selfcheck.probe(op, lambda *args: 1 / 0, "cpu", torch.float32)
    assert not outcome.ok and outcome.error == "ZeroDivisionError: division by zero"


def test_a_wrong_dropout_mask_fails_the_bitwise_check():
    def other_mask(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p, relu):
        return reference.bn_epilogue(x, weight, bias, residual, stats_mean, stats_var, seed + 1, eps, p, relu)

    outcome = selfcheck.probe("bn_epilogue", other_mask, "cpu", torch.float32)
    assert not outcome.ok and "train: dropout" in outcome.error


def test_a_wrong_gradient_fails():
    class Halved(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            return g / 2

    outcome = selfcheck.probe("mask_pool", lambda x, m: Halved.apply(reference.mask_pool(x, m)), "cpu", torch.float32)
    assert not outcome.ok and "grad of input 0" in outcome.error


# ------------------------------------------------------------------------------------------- auto uses them


@pytest.mark.needs_impl("cpp")
def test_auto_probes_once_then_uses_the_cache(probed, tmp_path):
    x, mask = mask_pool_args()
    assert torch.equal(ops.mask_pool(x, mask), torch.ops.skelemix.mask_pool(x, mask))
    ops.mask_pool(x, mask)
    assert probed == [("mask_pool", torch.float32)]
    (cached,) = cache_files(tmp_path)
    record = json.loads(cached.read_text())
    assert record["key"]["op"] == "mask_pool" and record["key"]["impl"] == "cpp" and record["max_error"] < 1e-6
    selfcheck.forget()  # a new process: the disk cache answers
    assert _impl.choose("mask_pool", "auto", CPU, implementations("mask_pool"), torch.float32) == "cpp"
    assert len(probed) == 1
    ops.mask_pool(x.double(), mask)  # another dtype is another key
    assert probed[-1] == ("mask_pool", torch.float64) and len(cache_files(tmp_path)) == 2


@pytest.mark.needs_impl("cpp")
def test_a_new_build_or_a_damaged_cache_file_is_probed_again(probed, tmp_path, monkeypatch):
    x, mask = mask_pool_args()
    ops.mask_pool(x, mask)
    (cached,) = cache_files(tmp_path)
    cached.write_text("{not json")
    selfcheck.forget()
    ops.mask_pool(x, mask)
    assert len(probed) == 2 and json.loads(cached.read_text())["key"]["op"] == "mask_pool"  # rewritten
    monkeypatch.setattr(selfcheck, "build_id", lambda impl, op: "a rebuilt _C")
    selfcheck.forget()
    ops.mask_pool(x, mask)
    assert len(probed) == 3 and len(cache_files(tmp_path)) == 2


@pytest.mark.needs_impl("cpp")
def test_an_unwritable_cache_costs_only_a_repeated_probe(probed, tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv(selfcheck.CACHE_ENV, str(blocker / "cache"))  # mkdir under a file fails, even as root
    x, mask = mask_pool_args()
    for _ in range(2):
        selfcheck.forget()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(ops.mask_pool(x, mask), torch.ops.skelemix.mask_pool(x, mask))
    assert len(probed) == 2


@pytest.mark.needs_impl("cpp")
@pytest.mark.parametrize("bad", ["wrong", "crashing"])
def test_a_failing_implementation_warns_once_and_auto_falls_through(probed, tmp_path, monkeypatch, bad):
    wrong = wrong_graph_conv if bad == "wrong" else lambda *args: torch.ops.skelemix.graph_conv(args[0][:, :1], *args[1:])
    monkeypatch.setitem(implementations("graph_conv"), "cpp", wrong)
    x, weight, bias, A = torch.randn(2, 4, 8, 25), torch.randn(12, 4), torch.randn(12), torch.rand(3, 25, 25)
    with pytest.warns(RuntimeWarning) as record:
        out = ops.graph_conv(x, weight, bias, A)
        again = ops.graph_conv(x, weight, bias, A)
    (warning,) = [w for w in record if "self-check" in str(w.message)]
    message = str(warning.message)
    assert re.search(r"self-check of graph_conv impl='cpp' \(float32 on cpu .*\) against the eager reference failed",
                     message), message
    assert ("max error" if bad == "wrong" else "RuntimeError") in message
    assert "falls through to the next implementation (cpp, then eager)" in message
    assert "report it with the output of `python -m skelemix.info --check`" in message
    assert warning.filename != selfcheck.__file__  # points at the caller, not at the machinery
    want = reference.graph_conv(x, weight, bias, A)
    assert torch.equal(out, want) and torch.equal(again, want)  # eager, the next in line on the CPU
    assert cache_files(tmp_path) == [] and len(probed) == 1  # failures are not cached, and not probed twice


@pytest.mark.needs_impl("cpp")
def test_explicit_impls_run_unprobed(probed, monkeypatch):
    monkeypatch.setitem(implementations("graph_conv"), "cpp", wrong_graph_conv)
    x, weight, bias, A = torch.randn(2, 4, 8, 25), torch.randn(12, 4), torch.randn(12), torch.rand(3, 25, 25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ops.graph_conv(x, weight, bias, A, impl="cpp")
    assert torch.allclose(out, reference.graph_conv(x, weight, bias, A) * 1.01) and probed == []


def test_cpu_is_not_probed_by_default(monkeypatch):
    monkeypatch.setitem(implementations("graph_conv"), "cpp", wrong_graph_conv)
    selfcheck.forget()
    assert selfcheck.PROBED_DEVICE_TYPES == {"cuda"}
    assert selfcheck.trusted("graph_conv", "cpp", CPU, torch.float32, wrong_graph_conv)


def draws():
    return torch.rand(3), np.random.rand(3), random.random()


@pytest.mark.needs_impl("cpp")
def test_a_probe_leaves_every_rng_as_it_found_it(probed, tmp_path):
    """The same draws after the first op call with a cold cache (a probe runs), a warm one (none runs) and no
    probing at all: the probe cannot desynchronise a training run."""
    x, mask = mask_pool_args()
    runs = []
    for _ in range(2):
        selfcheck.forget()
        torch.manual_seed(5), np.random.seed(5), random.seed(5)
        ops.mask_pool(x, mask)
        runs.append(draws())
    selfcheck.PROBED_DEVICE_TYPES.clear()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    ops.mask_pool(x, mask)
    runs.append(draws())
    assert len(probed) == 1 and len(cache_files(tmp_path)) == 1  # cold, then warm
    for run in runs[1:]:
        assert torch.equal(run[0], runs[0][0]) and np.array_equal(run[1], runs[0][1]) and run[2] == runs[0][2]


@pytest.mark.needs_impl("cpp")
def test_no_probe_inside_a_compile_trace(probed):
    """Dynamo traces select(): an undecided implementation is not probed there but left out (the reference is
    traced); once an eager call has probed it, a new trace uses the C++ op."""
    x, mask = mask_pool_args()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    def fn(x, mask):
        return ops.mask_pool(x, mask)

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=backend)(x, mask)
    assert probed == [] and "skelemix.mask_pool" not in graphs[0]
    assert torch.allclose(out, reference.mask_pool(x, mask))
    fn(x, mask)  # eager: probes
    torch._dynamo.reset()
    torch.compile(fn, fullgraph=True, backend=backend)(x, mask)
    assert len(probed) == 1 and "skelemix.mask_pool" in graphs[1]
    torch._dynamo.reset()


@pytest.mark.needs_impl("cpp")
def test_prepare_decides_every_op_ahead(probed):
    chosen = ops.decide_auto("cpu", (torch.float32, torch.bfloat16))
    assert chosen == {(op, dtype): "cpp" for op in selfcheck.OPS for dtype in (torch.float32, torch.bfloat16)}
    assert len(probed) == 8
    ops.decide_auto("cpu", (torch.float32,))
    assert len(probed) == 8


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(selfcheck.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert selfcheck.cache_dir() == tmp_path / ".cache" / "skelemix"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert selfcheck.cache_dir() == tmp_path / "xdg" / "skelemix"
    monkeypatch.setenv(selfcheck.CACHE_ENV, str(tmp_path / "mine"))
    assert selfcheck.cache_dir() == tmp_path / "mine"


# -------------------------------------------------------------------------------- python -m skelemix.info --check


def table_cells(text):
    """{(op, impl): [cell per dtype]} from the first table of the --check output."""
    cells = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if line.startswith("| ") and parts[0] in selfcheck.OPS:
            cells.setdefault((parts[0], parts[1]), parts[2:])
    return cells


@pytest.mark.needs_impl("cpp")
def test_info_check_passes_the_cpp_ops(capsys):
    assert info.main(["--check"]) == 0
    out = capsys.readouterr().out
    cells = table_cells(out)
    assert "| op | impl | float32 | float64 | bfloat16 | float16 |" in out
    for op in selfcheck.OPS:
        assert cells[(op, "eager")] == ["reference"] * 4
        assert all(re.fullmatch(r"pass \d\.\de[+-]\d\d", c) for c in cells[(op, "cpp")]), cells[(op, "cpp")]
        assert cells[(op, "auto picks")] == ["cpp"] * 4
    assert "FAILED" not in out


@pytest.mark.needs_impl("cpp")
def test_info_check_reports_a_failure(capsys, monkeypatch):
    monkeypatch.setitem(implementations("graph_conv"), "cpp", wrong_graph_conv)
    assert info.main(["--check"]) == 1
    out = capsys.readouterr().out
    float32, float64, bfloat16, _ = table_cells(out)[("graph_conv", "cpp")]
    assert float32.startswith("FAIL ") and float64.startswith("FAIL ")
    assert bfloat16.startswith("pass ")  # 1% off is within bfloat16's tolerance
    assert "FAILED (a bug: please report it with this output):" in out
    assert re.search(r"graph_conv impl=cpp float32 on cpu: .*max error", out)


@pytest.mark.needs_impl("triton")
@pytest.mark.triton_interpret
@pytest.mark.parametrize("op", selfcheck.OPS)
def test_triton_kernels_pass_their_probes_in_the_interpreter(op):
    outcome = selfcheck.probe(op, implementations(op)["triton"], "cpu", torch.float32)
    assert outcome.ok, outcome.error
    assert selfcheck.build_id("triton", op).startswith("triton ")  # Triton's version and the kernels' sources


# ----------------------------------------------------------------------------------------------------- GPU


@pytest.mark.needs_cuda
def test_cuda_and_triton_kernels_pass_their_probes(probed):
    """On a GPU: every op's CUDA and Triton implementations pass (fp32 and bf16), quickly once compiled, leave
    the CUDA generator alone, and auto picks them."""
    failures, seen = [], 0
    cuda_rng = torch.cuda.get_rng_state()
    for op in selfcheck.OPS:
        for impl in ("cuda", "triton"):
            if not _extension.available(impl)[0] or impl not in implementations(op):
                continue
            for dtype in (torch.float32, torch.bfloat16):
                first = selfcheck.probe(op, implementations(op)[impl], "cuda", dtype)
                seen += 1
                if not first.ok:
                    failures.append(f"{op} {impl} {dtype}: {first.error}")
                    continue
                # Timed again: the first probe includes Triton's JIT compile, which the op's first call pays anyway.
                again = selfcheck.probe(op, implementations(op)[impl], "cuda", dtype)
                if not again.ok or again.seconds > 0.5:
                    failures.append(f"{op} {impl} {dtype}: {again.error or 'slow'}, {again.seconds:.2f} s (first "
                                    f"{first.seconds:.2f} s)")
    assert seen and not failures, "\n".join(failures)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    chosen = ops.decide_auto("cuda", (torch.float32,))
    assert all(impl != "eager" for impl in chosen.values()), chosen
