"""The Triton ops (skelemix/ops/_triton.py, kernels/) against the eager references.

On a CPU-only machine they run in Triton's interpreter (marker ``triton_interpret``; tests/conftest.py sets
``TRITON_INTERPRET=1`` before triton is imported when no GPU is visible): ``pytest -m triton_interpret``. The
``cuda`` cases run the compiled kernels on a GPU.

Low precision follows the rule "error against the fp32 reference <= 2 x the eager error in the same dtype + atol".
bf16 ``tl.dot`` is wrong in the interpreter (it multiplies raw 16-bit patterns), so under the interpreter the
graph_conv kernels cast bf16 tiles to fp32 before ``tl.dot``; the bf16 tensor-core path is tested on the GPU only.
"""
from __future__ import annotations

import math

import pytest
import torch

from skelemix import _extension, reference
from skelemix.ops import mask_pool
from skelemix.testing import assert_close_verbose, sample_inputs_mask_pool, tolerances

pytestmark = pytest.mark.needs_triton

DEVICES = [pytest.param("cpu", marks=pytest.mark.triton_interpret), pytest.param("cuda", marks=pytest.mark.needs_cuda)]
LOW = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def ops():
    """The registered triton ops (registering imports triton; conftest set TRITON_INTERPRET before)."""
    from skelemix.ops import _triton

    _triton.register()
    return _triton


def assert_low_precision(actual, eager, ref32, atol, name):
    """FlashAttention's rule: no worse than twice eager's own error in that dtype, plus atol."""
    err = (actual.double() - ref32.double()).abs().max().item() if actual.numel() else 0.0
    eager_err = (eager.double() - ref32.double()).abs().max().item() if eager.numel() else 0.0
    assert not actual.isnan().any(), f"{name}: NaN"
    assert err <= 2 * eager_err + atol, f"{name}: error {err:.3g} > 2 x eager error {eager_err:.3g} + {atol}"


def to(sample_args, dtype, requires_grad=False):
    """Copies of a sample's tensors: floating ones cast to dtype (and made leaves), others as they are."""
    out = []
    for a in sample_args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().to(dtype).requires_grad_(requires_grad)
        out.append(a)
    return out


# ---------------------------------------------------------------------------------------------------- mask_pool


@pytest.mark.parametrize("device", DEVICES)
def test_mask_pool_fp32_forward_backward(ops, device):
    rtol, atol = tolerances(torch.float32)
    for name, (x, mask) in sample_inputs_mask_pool(device, torch.float32, requires_grad=True):
        out = mask_pool(x, mask, impl="triton")
        expected = reference.mask_pool(x, mask)
        assert_close_verbose(out, expected, rtol, atol, name=f"{name} forward")
        grad = torch.randn(x.shape[0], x.shape[1], 2, device=device).transpose(1, 2)  # non-contiguous
        (actual,) = torch.autograd.grad(out, x, grad)
        (wanted,) = torch.autograd.grad(expected, x, grad)
        assert_close_verbose(actual, wanted, rtol, atol, name=f"{name} backward")


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_mask_pool_low_precision(ops, device, dtype):
    for name, args in sample_inputs_mask_pool(device, torch.float32):
        x32, mask = to(args, torch.float32, True)
        x, _ = to(args, dtype, True)
        xe, _ = to(args, dtype, True)
        out, eager, ref = mask_pool(x, mask, impl="triton"), reference.mask_pool(xe, mask), reference.mask_pool(x32, mask)
        assert out.dtype == dtype
        assert_low_precision(out, eager, ref, 1e-3, f"{name} {dtype} forward")
        grad = torch.randn_like(ref)
        grads = [torch.autograd.grad(o, i, grad.to(o.dtype))[0] for o, i in ((out, x), (eager, xe), (ref, x32))]
        assert_low_precision(*grads, 1e-3, f"{name} {dtype} backward")


def test_mask_pool_double_backward(ops):
    x, mask = sample_inputs_mask_pool("cpu", torch.float32)[1].args
    x.requires_grad_(True)
    grad = torch.randn(x.shape[0], 2, x.shape[1], requires_grad=True)
    results = []
    for fn in (lambda x: mask_pool(x, mask, impl="triton"), lambda x: reference.mask_pool(x, mask)):
        (gx,) = torch.autograd.grad(fn(x), x, grad, create_graph=True)
        results.append(torch.autograd.grad((gx * gx).sum(), grad)[0])
    assert_close_verbose(results[0], results[1], 1e-5, 1e-6, name="grad of grad")


@pytest.mark.parametrize("device", DEVICES)
def test_mask_pool_opcheck(ops, device):
    x, mask = sample_inputs_mask_pool(device, torch.float32, requires_grad=True)[2].args
    grad = torch.randn(x.shape[0], 2, x.shape[1], device=device)
    opcheck(torch.ops.skelemix.mask_pool_triton.default, (x, mask))
    opcheck(torch.ops.skelemix._mask_pool_backward_triton.default, (grad, mask))


def test_triton_rejects_float64(ops):
    x, mask = sample_inputs_mask_pool("cpu", torch.float64)[0].args
    with pytest.raises(RuntimeError, match="impl='triton' takes float32, float16 or bfloat16 x; got torch.float64"):
        mask_pool(x, mask, impl="triton")


def opcheck(op, args):
    """``torch.library.opcheck``; in the interpreter without the AOTAutograd test, which needs traceable kernels
    (``wrap_triton`` passes interpreted kernels through untraced, so functionalized tracing cannot see them)."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not _extension.triton_interpret():
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op, args, test_utils=utils)


# ---------------------------------------------------------------------------------------------- skelemix_gather


def gather_reference(x, partner, joints, span, block):
    """Eager oracle of the (R, N) gather schema: mixed[r*N+n, :, t, v] = x[partner[r, n], :, t, v] where
    joints[r, g, v] and start <= t // block < end (g = 0 if G == 1 else n), else x[n]; mask at block resolution."""
    N, C, T, V, M = x.shape
    R, G = joints.shape[:2]
    blocks = torch.arange(math.ceil(T / block), device=x.device)
    mask = ((blocks >= span[..., :1]) & (blocks < span[..., 1:]))[..., None] & joints[:, :, None, :]
    mask = mask.expand(R, N, -1, V)
    frames = mask.repeat_interleave(block, dim=2)[:, :, :T]  # (R, N, T, V)
    mixed = torch.where(frames[:, :, None, :, :, None], x[partner], x[None])
    return mixed.reshape(R * N, C, T, V, M), mask


def sample_inputs_gather(device, dtype=torch.float32):
    def case(N, C, T, V, M, R, G, block, x=None):
        x = torch.randn(N, C, T, V, M, device=device, dtype=dtype) if x is None else x
        partner = torch.randint(0, max(N, 1), (R, N), device=device)
        joints = torch.rand(R, G, V, device=device) < 0.5
        span = torch.randint(0, math.ceil(T / block) + 1, (R, G, 2), device=device).sort(-1).values
        return x, partner, joints, span, block

    x_perm = torch.randn(3, 7, 2, 4, 5, device=device, dtype=dtype).permute(0, 4, 1, 3, 2)  # (3, 5, 7, 4, 2)
    full = case(4, 3, 8, 5, 2, 1, 4, 2)
    full[2][:], full[3][..., 0], full[3][..., 1] = True, 0, 4  # everything from the partner
    return [
        ("shared_region", case(4, 3, 8, 5, 2, 1, 1, 2)),
        ("per_sample_odd", case(3, 2, 7, 3, 1, 2, 3, 3)),  # T not a multiple of block
        ("repeats", case(5, 3, 9, 11, 2, 3, 5, 4)),
        ("block_one", case(2, 1, 5, 25, 2, 2, 1, 1)),
        ("full_region", full),
        ("non_contiguous", case(3, 5, 7, 4, 2, 2, 3, 2, x=x_perm)),
        ("empty_batch", case(0, 3, 4, 5, 1, 2, 1, 2)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_gather_matches_reference_exactly(ops, device, dtype):
    # A pure copy: bit-exact in every dtype.
    for name, args in sample_inputs_gather(device, dtype):
        torch.full((4096,), float("nan"), device=device)  # leave a NaN block for the allocator to hand out
        mixed, mask = ops.skelemix_gather(*args)
        want_mixed, want_mask = gather_reference(*args)
        assert mask.dtype == torch.bool and mask.shape == want_mask.shape, name
        assert torch.equal(mask, want_mask), f"{name}: mask"
        assert mixed.shape == want_mixed.shape and mixed.dtype == dtype, name
        assert torch.equal(mixed, want_mixed), f"{name}: {int((mixed != want_mixed).sum())} elements differ"


@pytest.mark.parametrize("device", DEVICES)
def test_gather_opcheck(ops, device):
    opcheck(torch.ops.skelemix.skelemix_gather_triton.default, sample_inputs_gather(device)[1][1])


@pytest.mark.parametrize("bad, match", [
    (lambda a: (a[0][0], *a[1:]), "x must be 5-D"),
    (lambda a: (a[0], a[1][:, :2], *a[2:]), r"partner must be an int64 tensor of shape \(R, 3\); got torch.int64 \[2, 2\]"),
    (lambda a: (a[0], a[1], a[2][:, :2], *a[3:]), r"joints must be a bool tensor of shape \(2, G, 3\) with G in"),
    (lambda a: (*a[:3], a[3].int(), a[4]), r"span must be an int64 tensor of shape \(2, 3, 2\)"),
    (lambda a: (*a[:4], 0), "block must be >= 1"),
])
def test_gather_errors(ops, bad, match):
    args = sample_inputs_gather("cpu")[1][1]
    with pytest.raises(RuntimeError, match="skelemix::skelemix_gather_triton: " + match):
        ops.skelemix_gather(*bad(args))
