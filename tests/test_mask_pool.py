"""skelemix.ops.mask_pool: the C++ op against the eager reference, its PT2 surface, errors and impl selection."""
import importlib
import os

import pytest
import torch

from skelemix import _extension, reference
from skelemix.ops import mask_pool
from skelemix.testing import assert_close_verbose, poison_allocator, require_impl, sample_inputs_mask_pool, tolerances

mask_pool_module = importlib.import_module("skelemix.ops.mask_pool")  # the attribute is the function

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
IMPL_OF = {"cpu": "cpp", "cuda": "cuda"}


needs_cpp = pytest.mark.skipif(not _extension.HAS_CPP, reason=f"C++ ops not loaded: {_extension.LOAD_ERROR}")


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


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_reference(device, dtype):
    impl = IMPL_OF[device]
    require_impl(impl)
    rtol, atol = tolerances(dtype)
    for name, (x, mask) in sample_inputs_mask_pool(device, dtype):
        poison_allocator(x.shape[0] * 2 * x.shape[1], dtype, device)
        out = mask_pool(x, mask, impl=impl)
        assert_close_verbose(out, reference.mask_pool(x, mask), rtol, atol, name=f"{name} forward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference(device, dtype):
    impl = IMPL_OF[device]
    require_impl(impl)
    rtol, atol = tolerances(dtype)
    for name, (x, mask) in sample_inputs_mask_pool(device, dtype, requires_grad=True):
        B, C = x.shape[:2]
        # A non-contiguous incoming gradient, as autograd may pass.
        grad_out = torch.randn(B, C, 2, device=device, dtype=dtype).transpose(1, 2)
        (expected,) = torch.autograd.grad(reference.mask_pool(x, mask), x, grad_out)
        poison_allocator(x.numel(), dtype, device)
        (actual,) = torch.autograd.grad(mask_pool(x, mask, impl=impl), x, grad_out)
        assert not actual.isnan().any(), f"{name}: NaN in grad_x"
        assert_close_verbose(actual, expected, rtol, atol, name=f"{name} backward")


@pytest.mark.needs_cuda
def test_cuda_runs_on_current_stream():
    """The kernels must run on the current stream (extension-cpp's reduce-overhead bug)."""
    device, impl = "cuda", "cuda"
    require_impl(impl)
    x, mask = sample_inputs_mask_pool(device, torch.float32)[1].args
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        big = x.repeat(64, 1, 1, 1)  # queue work first, so a kernel on the wrong stream reads too early
        out = mask_pool(big, mask, impl=impl)
    stream.synchronize()
    assert_close_verbose(out, reference.mask_pool(big, mask), *tolerances(torch.float32), name="side stream")


# ------------------------------------------------------------------------------------------- PT2 and autograd


@needs_cpp
def test_gradcheck_and_gradgradcheck():
    for name, (x, mask) in sample_inputs_mask_pool("cpu", torch.float64, requires_grad=True):
        if x.numel() == 0:
            continue

        def fn(x, mask=mask):
            return mask_pool(x, mask, impl="cpp")

        assert torch.autograd.gradcheck(fn, (x,)), name
        assert torch.autograd.gradgradcheck(fn, (x,)), name


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, requires_grad):
    require_impl(IMPL_OF[device])
    for name, (x, mask) in sample_inputs_mask_pool(device, torch.float32, requires_grad=requires_grad):
        torch.library.opcheck(torch.ops.skelemix.mask_pool.default, (x, mask))
        grad = torch.randn(x.shape[0], 2, x.shape[1], device=device, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.skelemix._mask_pool_backward.default, (grad, mask))


@needs_cpp
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(dynamic):
    def fn(x, mask):
        return mask_pool(x, mask, impl="cpp").square().sum()

    # aot_eager traces forward and backward through the fake kernels without Inductor's slow CPU codegen.
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    x, mask = sample_inputs_mask_pool("cpu", torch.float32, requires_grad=True)[1].args
    (expected,) = torch.autograd.grad(fn(x, mask), x)
    loss = compiled(x, mask)
    (actual,) = torch.autograd.grad(loss, x)
    assert_close_verbose(loss, fn(x, mask), 1e-5, 1e-6, name="compiled loss")
    assert_close_verbose(actual, expected, 1e-5, 1e-6, name="compiled grad")


# -------------------------------------------------------------------------------------------------- errors

_T, _V = 4, 5
BAD_INPUTS = [
    pytest.param(lambda: (torch.randn(2, 3, _T), torch.ones(1, _T, _V, dtype=torch.bool)), ValueError,
                 r"x must be 4-D \(B, C, T, V\); got shape \[2, 3, 4\]", id="x_3d"),
    pytest.param(lambda: (torch.ones(2, 3, _T, _V, dtype=torch.int64), torch.ones(1, _T, _V, dtype=torch.bool)),
                 TypeError, r"x must be floating point .*; got (torch\.int64|Long)", id="x_int"),
    pytest.param(lambda: (torch.randn(2, 3, _T, _V), torch.ones(_T, _V, dtype=torch.bool)), ValueError,
                 r"mask must be 3-D \(G, T, V\); got shape \[4, 5\]", id="mask_2d"),
    pytest.param(lambda: (torch.randn(2, 3, _T, _V), torch.ones(1, _T, _V)), TypeError,
                 r"mask must be a bool tensor; got (torch\.float32|Float)", id="mask_float"),
    pytest.param(lambda: (torch.randn(2, 3, _T, _V), torch.ones(1, _T, _V + 1, dtype=torch.bool)), ValueError,
                 r"mask must have shape \(G, 4, 5\) to match x of shape \[2, 3, 4, 5\]; got shape \[1, 4, 6\]",
                 id="mask_wrong_tv"),
    pytest.param(lambda: (torch.randn(5, 3, _T, _V), torch.ones(2, _T, _V, dtype=torch.bool)), ValueError,
                 r"the batch size B=5 must be a multiple of the number of masks G=2", id="b_not_multiple_of_g"),
    pytest.param(lambda: (torch.randn(2, 3, _T, _V), torch.ones(0, _T, _V, dtype=torch.bool)), ValueError,
                 r"the batch size B=2 must be a multiple of the number of masks G=0", id="no_masks"),
    pytest.param(lambda: (torch.randn(2, 3, _T, _V), torch.ones(1, _T, _V, dtype=torch.bool, device="meta")),
                 ValueError, r"x and mask must be on the same device; got x on cpu and mask on meta",
                 id="mixed_devices"),
]


@pytest.mark.parametrize("make, exc, match", BAD_INPUTS)
def test_wrapper_errors(make, exc, match):
    x, mask = make()
    with pytest.raises(exc, match=r"skelemix\.ops\.mask_pool: " + match):
        mask_pool(x, mask)


@needs_cpp
@pytest.mark.parametrize("make, exc, match", BAD_INPUTS)
def test_raw_op_errors(make, exc, match):
    x, mask = make()
    # The CPU kernel or, for meta inputs, the fake kernel raises; both prefix the op name.
    with pytest.raises(RuntimeError, match=r"skelemix::mask_pool: " + match):
        torch.ops.skelemix.mask_pool(x, mask)


@needs_cpp
@pytest.mark.parametrize("grad, mask, match", [
    pytest.param(torch.randn(2, 3), torch.ones(1, 4, 5, dtype=torch.bool), r"grad must be 3-D \(B, 2, C\)", id="2d"),
    pytest.param(torch.randn(2, 3, 3), torch.ones(1, 4, 5, dtype=torch.bool), r"grad must have shape \(B, 2, C\); "
                 r"got shape \[2, 3, 3\]", id="not_two"),
    pytest.param(torch.randn(3, 2, 3), torch.ones(2, 4, 5, dtype=torch.bool), r"the batch size B=3 must be a multiple .* G=2",
                 id="b_not_multiple_of_g"),
    pytest.param(torch.randn(2, 2, 3), torch.ones(1, 4, 5), r"mask must be a bool tensor", id="mask_float"),
])
def test_raw_backward_errors(grad, mask, match):
    with pytest.raises(RuntimeError, match=r"skelemix::_mask_pool_backward: " + match):
        torch.ops.skelemix._mask_pool_backward(grad, mask)


# ----------------------------------------------------------------------------------------- impl selection


def test_impl_triton_on_cpu_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors need Triton's interpreter (tests/test_triton.py)
    x, mask = sample_inputs_mask_pool("cpu")[0].args
    with pytest.raises((NotImplementedError, RuntimeError, ValueError), match=r"impl='triton'"):
        mask_pool(x, mask, impl="triton")


def test_impl_cuda_on_cpu_raises():
    x, mask = sample_inputs_mask_pool("cpu")[0].args
    with pytest.raises((RuntimeError, ValueError), match=r"impl='cuda'"):
        mask_pool(x, mask, impl="cuda")


def test_unknown_impl_raises():
    x, mask = sample_inputs_mask_pool("cpu")[0].args
    with pytest.raises(ValueError, match="impl must be one of"):
        mask_pool(x, mask, impl="fast")


def test_auto_on_cpu_picks_cpp_when_built():
    from skelemix.ops._impl import select

    chosen = select("mask_pool", "auto", torch.device("cpu"), mask_pool_module._IMPLEMENTATIONS)
    expected = "cpp" if _extension.HAS_CPP else "eager"
    assert chosen is mask_pool_module._IMPLEMENTATIONS[expected]


def test_eager_always_works():
    for name, (x, mask) in sample_inputs_mask_pool("cpu", torch.float32):
        assert_close_verbose(mask_pool(x, mask, impl="eager"), reference.mask_pool(x, mask), 0, 0, name=name)
