"""skelemix.ops.mask_pool: every implementation against the eager reference, its PT2 surface, errors and impl
selection."""
import importlib

import pytest
import torch

from skelemix import _extension, reference
from skelemix.ops import mask_pool
from skelemix.testing import (DTYPES, LOW_PRECISION, assert_at_most_twice_eager, assert_close_verbose, compile_backend,
                              impl_cases, leaves, opcheck, poison_allocator, raw_ops, sample_inputs_mask_pool,
                              tolerances)

mask_pool_module = importlib.import_module("skelemix.ops.mask_pool")  # the attribute is the function
OPS = ("mask_pool", "_mask_pool_backward")  # the raw ops: forward, backward


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("impl, device, dtype", impl_cases(dtypes=DTYPES))
def test_forward_matches_reference(impl, device, dtype):
    rtol, atol = tolerances(dtype)
    for name, (x, mask) in sample_inputs_mask_pool(device, dtype):
        poison_allocator(x.shape[0] * 2 * x.shape[1], dtype, device)
        out = mask_pool(x, mask, impl=impl)
        assert_close_verbose(out, reference.mask_pool(x, mask), rtol, atol, name=f"{name} forward")


@pytest.mark.parametrize("impl, device, dtype", impl_cases(dtypes=DTYPES))
def test_backward_matches_reference(impl, device, dtype):
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


@pytest.mark.parametrize("impl, device, dtype", impl_cases(dtypes=LOW_PRECISION))
def test_low_precision_error_at_most_twice_eager(impl, device, dtype):
    for name, args in sample_inputs_mask_pool(device, torch.float32, requires_grad=True):
        (x64, mask), (x, _), (xe, _) = leaves(args, torch.float64), leaves(args, dtype), leaves(args, dtype)
        out, eager = mask_pool(x, mask, impl=impl), reference.mask_pool(xe, mask)
        oracle = reference.mask_pool(x64, mask)
        assert out.dtype == dtype
        assert_at_most_twice_eager(out, eager, oracle, 1e-3, f"{name} {dtype} forward")
        grad = torch.randn_like(oracle)
        grads = [torch.autograd.grad(o, i, grad.to(o.dtype))[0] for o, i in ((out, x), (eager, xe), (oracle, x64))]
        assert_at_most_twice_eager(*grads, 1e-3, f"{name} {dtype} backward")


@pytest.mark.parametrize("impl, device", impl_cases())
def test_small_outside_next_to_a_large_inside(impl, device):
    """Post-ReLU features whose masked region dominates: the outside mean must come from its own sum. As the
    total minus the inside, fp32 cancellation left it wrong by about ulp(total) / cells outside (~1e-2 here,
    where the outside mean is ~1e-3)."""
    B, C, T, V = 2, 8, 16, 25
    mask = torch.ones(1, T, V, dtype=torch.bool, device=device)
    mask[0, 0, :3] = False  # 3 cells outside, 397 inside
    x = torch.randn(B, C, T, V, device=device).relu() * 1e-3
    x = torch.where(mask, 1000.0 + 100.0 * torch.rand(B, C, T, V, device=device), x)
    out = mask_pool(x, mask, impl=impl)
    expected = reference.mask_pool(x.double(), mask).float()  # float64: no cancellation in the reference either
    assert_close_verbose(out[:, 1], expected[:, 1], 1e-5, 1e-7, name="outside mean")
    assert_close_verbose(out[:, 0], expected[:, 0], 1e-5, 1e-6, name="inside mean")


@pytest.mark.parametrize("impl, device", impl_cases(devices=("cuda",)))
def test_runs_on_current_stream(impl, device):
    """The kernels must run on the current stream (extension-cpp's reduce-overhead bug)."""
    x, mask = sample_inputs_mask_pool(device, torch.float32)[1].args
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        big = x.repeat(64, 1, 1, 1)  # queue work first, so a kernel on the wrong stream reads too early
        out = mask_pool(big, mask, impl=impl)
    stream.synchronize()
    assert_close_verbose(out, reference.mask_pool(big, mask), *tolerances(torch.float32), name="side stream")


# ------------------------------------------------------------------------------------------- PT2 and autograd


@pytest.mark.needs_impl("cpp")
def test_gradcheck_and_gradgradcheck():
    for name, (x, mask) in sample_inputs_mask_pool("cpu", torch.float64, requires_grad=True):
        if x.numel() == 0:
            continue

        def fn(x, mask=mask):
            return mask_pool(x, mask, impl="cpp")

        assert torch.autograd.gradcheck(fn, (x,)), name
        assert torch.autograd.gradgradcheck(fn, (x,)), name


@pytest.mark.parametrize("impl, device", impl_cases())
def test_double_backward_matches_reference(impl, device):
    """The backward's own gradient (the forward: each op is the other's adjoint), in float32 for every
    implementation."""
    x, mask = sample_inputs_mask_pool(device, torch.float32)[1].args
    x.requires_grad_(True)
    grad = torch.randn(x.shape[0], 2, x.shape[1], device=device, requires_grad=True)
    results = []
    for fn in (lambda x: mask_pool(x, mask, impl=impl), lambda x: reference.mask_pool(x, mask)):
        (gx,) = torch.autograd.grad(fn(x), x, grad, create_graph=True)
        results.append(torch.autograd.grad((gx * gx).sum(), grad)[0])
    assert_close_verbose(results[0], results[1], 1e-5, 1e-6, name="grad of grad")


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("impl, device", impl_cases())
def test_opcheck(impl, device, requires_grad):
    forward, backward = raw_ops(impl, *OPS)
    for name, (x, mask) in sample_inputs_mask_pool(device, torch.float32, requires_grad=requires_grad):
        opcheck(forward.default, (x, mask))
        grad = torch.randn(x.shape[0], 2, x.shape[1], device=device, requires_grad=requires_grad)
        opcheck(backward.default, (grad, mask))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("impl, device", impl_cases())
def test_compile_fullgraph(impl, device, dynamic):
    def fn(x, mask):
        return mask_pool(x, mask, impl=impl).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend(impl), dynamic=dynamic)
    x, mask = sample_inputs_mask_pool(device, torch.float32, requires_grad=True)[1].args
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
# The raw ops that check CPU tensors: the C++ CPU kernel (its fake kernel for meta inputs) and the Triton op.
RAW = impl_cases(("cpp", "triton"), devices=("cpu",))


@pytest.mark.parametrize("make, exc, match", BAD_INPUTS)
def test_wrapper_errors(make, exc, match):
    x, mask = make()
    with pytest.raises(exc, match=r"skelemix\.ops\.mask_pool: " + match):
        mask_pool(x, mask)


@pytest.mark.parametrize("make, exc, match", BAD_INPUTS)
@pytest.mark.parametrize("impl, device", RAW)
def test_raw_op_errors(impl, device, make, exc, match):
    forward, _ = raw_ops(impl, *OPS)
    x, mask = make()
    with pytest.raises(RuntimeError, match=f"{forward.default.name()}: " + match):
        forward(x, mask)


@pytest.mark.parametrize("grad, mask, match", [
    pytest.param(torch.randn(2, 3), torch.ones(1, 4, 5, dtype=torch.bool), r"grad must be 3-D \(B, 2, C\)", id="2d"),
    pytest.param(torch.randn(2, 3, 3), torch.ones(1, 4, 5, dtype=torch.bool), r"grad must have shape \(B, 2, C\); "
                 r"got shape \[2, 3, 3\]", id="not_two"),
    pytest.param(torch.randn(3, 2, 3), torch.ones(2, 4, 5, dtype=torch.bool), r"the batch size B=3 must be a multiple .* G=2",
                 id="b_not_multiple_of_g"),
    pytest.param(torch.randn(2, 2, 3), torch.ones(1, 4, 5), r"mask must be a bool tensor", id="mask_float"),
])
@pytest.mark.parametrize("impl, device", RAW)
def test_raw_backward_errors(impl, device, grad, mask, match):
    _, backward = raw_ops(impl, *OPS)
    with pytest.raises(RuntimeError, match=f"{backward.default.name()}: " + match):
        backward(grad, mask)


@pytest.mark.parametrize("impl, device", impl_cases(("triton",)))
def test_triton_refuses_float64(impl, device):
    x, mask = sample_inputs_mask_pool(device, torch.float64)[0].args
    with pytest.raises(RuntimeError, match="impl='triton' takes float32, float16 or bfloat16 x; got torch.float64"):
        mask_pool(x, mask, impl="triton")


@pytest.mark.needs_triton
def test_launch_settings_are_pure_and_bounded():
    from skelemix.kernels import mask_pool as kernels

    assert kernels.settings(256, 16 * 25) == (8, 512, 8)  # (BLOCK_C, BLOCK_S, num_warps): 4096-element tiles
    with pytest.raises(ValueError, match="more than 65535 programs"):
        kernels.settings(1 << 25, 4)


# ----------------------------------------------------------------------------------------- impl selection


def test_impl_triton_on_cpu_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors need Triton's interpreter
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
