"""The Triton ops (skelemix/ops/_triton.py, kernels/) against the eager references.

On a CPU-only machine they run in Triton's interpreter (marker ``triton_interpret``; tests/conftest.py sets
``TRITON_INTERPRET=1`` before triton is imported when no GPU is visible): ``pytest -m triton_interpret``. The
``cuda`` cases run the compiled kernels on a GPU.

Low precision follows the rule "error against the fp32 reference <= 2 x the eager error in the same dtype + atol".
Two interpreter bugs (Triton 3.8) are worked around under the interpreter only, so bf16 there checks the kernels'
indexing and fp32 accumulation but not the bf16 instructions, which only the ``cuda`` cases test:
- ``tl.dot`` on bf16 multiplies the raw 16-bit patterns: the graph_conv kernels cast bf16 tiles to fp32 first;
- fp32 -> bf16 casts round toward zero (GPUs round to nearest even): bf16 results are written to fp32 buffers
  that torch rounds.
"""
from __future__ import annotations

import math

import pytest
import torch

from skelemix import _extension, reference
from skelemix.ops import mask_pool
from skelemix.testing import assert_close_verbose, poison_allocator, sample_inputs_mask_pool, tolerances

pytestmark = pytest.mark.needs_triton

interpreted = pytest.mark.triton_interpret  # CPU tensors: the kernels run in Triton's interpreter
DEVICES = [pytest.param("cpu", marks=interpreted), pytest.param("cuda", marks=pytest.mark.needs_cuda)]
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


def poison(device, numel=1 << 16):
    """Free a NaN block: on CUDA the caching allocator hands it to the op's next allocation, so a kernel that
    leaves elements unwritten shows NaNs. (The CPU allocator does not reuse it; there the comparison of random
    inputs against the reference is what catches unwritten elements.)"""
    block = torch.full((numel,), float("nan"), device=device)
    del block


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
        poison(device)
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
        out, eager = mask_pool(x, mask, impl="triton"), reference.mask_pool(xe, mask)
        ref = reference.mask_pool(x32, mask)
        assert out.dtype == dtype
        assert_low_precision(out, eager, ref, 1e-3, f"{name} {dtype} forward")
        grad = torch.randn_like(ref)
        grads = [torch.autograd.grad(o, i, grad.to(o.dtype))[0] for o, i in ((out, x), (eager, xe), (ref, x32))]
        assert_low_precision(*grads, 1e-3, f"{name} {dtype} backward")


@pytest.mark.parametrize("device", DEVICES)
def test_mask_pool_small_outside_next_to_a_large_inside(ops, device):
    """Post-ReLU features whose masked region dominates: the outside mean must come from its own sum. As the
    total minus the inside, fp32 cancellation left it wrong by about ulp(total) / cells outside (~1e-2 here,
    where the outside mean is ~1e-3)."""
    B, C, T, V = 2, 8, 16, 25
    mask = torch.ones(1, T, V, dtype=torch.bool, device=device)
    mask[0, 0, :3] = False  # 3 cells outside, 397 inside
    x = torch.randn(B, C, T, V, device=device).relu() * 1e-3
    x = torch.where(mask, 1000.0 + 100.0 * torch.rand(B, C, T, V, device=device), x)
    out = mask_pool(x, mask, impl="triton")
    expected = reference.mask_pool(x.double(), mask).float()  # float64: no cancellation in the reference either
    assert_close_verbose(out[:, 1], expected[:, 1], 1e-5, 1e-7, name="outside mean")
    assert_close_verbose(out[:, 0], expected[:, 0], 1e-5, 1e-6, name="inside mean")


@interpreted
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


@interpreted
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
        poison(device)
        mixed, mask = ops.skelemix_gather(*args)
        want_mixed, want_mask = gather_reference(*args)
        assert mask.dtype == torch.bool and mask.shape == want_mask.shape, name
        assert torch.equal(mask, want_mask), f"{name}: mask"
        assert mixed.shape == want_mixed.shape and mixed.dtype == dtype, name
        assert torch.equal(mixed, want_mixed), f"{name}: {int((mixed != want_mixed).sum())} elements differ"


@pytest.mark.parametrize("device", DEVICES)
def test_gather_unchecked_bad_partner_stays_in_bounds(device):
    """skelemix.ops.skelemix_gather(..., check_values=False) skips the host check: an out-of-range partner then
    copies the sample itself instead of reading outside x."""
    from skelemix.ops import skelemix_gather

    x, partner, joints, span, block = sample_inputs_gather(device)[0][1]
    bad = partner.clone()
    bad[0, 1], bad[0, 2] = 4, -3
    mixed, mask = skelemix_gather(x, bad, joints, span, block, impl="triton", check_values=False)
    fixed = bad.clone()
    fixed[0, 1], fixed[0, 2] = 1, 2
    want_mixed, want_mask = gather_reference(x, fixed, joints, span, block)
    assert torch.equal(mixed, want_mixed) and torch.equal(mask, want_mask)
    with pytest.raises(ValueError, match="partner must hold sample indices"):
        skelemix_gather(x, bad, joints, span, block, impl="triton")


@pytest.mark.parametrize("device", DEVICES)
def test_gather_opcheck(ops, device):
    opcheck(torch.ops.skelemix.skelemix_gather_triton.default, sample_inputs_gather(device)[1][1])


@interpreted
@pytest.mark.parametrize("bad, match", [
    (lambda a: (a[0][0], *a[1:]), "x must be 5-D"),
    (lambda a: (a[0], a[1][:, :2], *a[2:]),
     r"partner must be an int64 tensor of shape \(R, 3\); got torch.int64 \[2, 2\]"),
    (lambda a: (a[0], a[1], a[2][:, :2], *a[3:]), r"joints must be a bool tensor of shape \(2, G, 3\) with G in"),
    (lambda a: (*a[:3], a[3].int(), a[4]), r"span must be an int64 tensor of shape \(2, 3, 2\)"),
    (lambda a: (*a[:4], 0), "block must be >= 1"),
])
def test_gather_errors(ops, bad, match):
    args = sample_inputs_gather("cpu")[1][1]
    with pytest.raises(RuntimeError, match="skelemix::skelemix_gather_triton: " + match):
        ops.skelemix_gather(*bad(args))


# --------------------------------------------------------------------------------------------------- graph_conv


def sample_inputs_graph_conv(device, dtype=torch.float32, requires_grad=False):
    """(name, (x, weight, bias, A)) cases: ST-GCN-like, odd and tile-crossing sizes, width 1, strided views."""
    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    def case(N, Cin, Cout, T, V, K, bias=True):
        return t(N, Cin, T, V), t(K * Cout, Cin) / math.sqrt(Cin), t(K * Cout) if bias else None, t(K, V, V) / V

    x_perm = t(2, 6, 25, 5).permute(0, 3, 1, 2)  # (2, 5, 6, 25) from a (N, T, V, C) buffer
    cases = [
        ("stgcn_like", case(2, 3, 4, 16, 25, 3)),
        ("odd_no_bias", case(3, 5, 6, 7, 3, 2, bias=False)),
        ("crosses_tiles", case(1, 40, 70, 5, 25, 3)),  # Cin > BLOCK_I, Cout > BLOCK_C, T > BLOCK_T
        ("one_joint_one_subset", case(2, 3, 2, 4, 1, 1)),
        ("one_frame", case(2, 4, 3, 1, 17, 3)),
        ("strided", (x_perm, t(5, 8).t(), t(16)[::2], t(2, 25, 25).transpose(1, 2) / 25)),
        ("empty_batch", case(0, 3, 4, 5, 6, 3)),
    ]
    if requires_grad:
        cases = [(n, tuple(a.requires_grad_() if a is not None else None for a in args)) for n, args in cases]
    return cases


def assert_close_scaled(actual, expected, rtol, name):
    """Elementwise rtol plus an atol of rtol x max|expected|: sums of many products cancel to near-zero entries."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    assert_close_verbose(actual, expected, rtol, rtol * scale + 1e-7, name=name)


def graph_conv_grads(fn, args, grad):
    inputs = [a for a in args if a is not None and a.requires_grad]
    out = fn(*args)
    return out, torch.autograd.grad(out, inputs, grad) if out.numel() else [torch.zeros_like(a) for a in inputs]


@pytest.mark.parametrize("device", DEVICES)
def test_graph_conv_fp32_forward_backward(ops, device):
    # fp32 parity needs IEEE fp32 dots: the kernels use TF32 only when torch's matmul precision allows it.
    assert torch.get_float32_matmul_precision() == "highest"
    for name, args in sample_inputs_graph_conv(device, requires_grad=True):
        expected = reference.graph_conv(*args)
        grad = torch.randn_like(expected)
        poison(device)
        out, grads = graph_conv_grads(lambda *a: ops.graph_conv(*a), args, grad)
        _, want = graph_conv_grads(reference.graph_conv, args, grad)
        assert_close_scaled(out, expected, 1e-5, f"{name} forward")
        for arg, g, w in zip(("x", "weight", "bias", "A"), grads, want):
            assert_close_scaled(g, w, 1e-5, f"{name} grad {arg}")


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_graph_conv_low_precision(ops, device, dtype):
    for name, args in sample_inputs_graph_conv(device):
        a32, a, ae = (to(args, d, True) for d in (torch.float32, dtype, dtype))
        ref = reference.graph_conv(*a32)
        grad = torch.randn_like(ref)
        ref, ref_grads = graph_conv_grads(reference.graph_conv, a32, grad)
        out, grads = graph_conv_grads(lambda *z: ops.graph_conv(*z), a, grad.to(dtype))
        eager, eager_grads = graph_conv_grads(reference.graph_conv, ae, grad.to(dtype))
        assert out.dtype == dtype
        scale = ref.abs().max().item() if ref.numel() else 0.0
        assert_low_precision(out, eager, ref, 1e-3 * scale, f"{name} {dtype} forward")
        for arg, g, e, r in zip(("x", "weight", "bias", "A"), grads, eager_grads, ref_grads):
            scale = r.abs().max().item() if r.numel() else 0.0
            assert_low_precision(g, e, r, 1e-3 * scale, f"{name} {dtype} grad {arg}")


@interpreted
def test_graph_conv_double_backward_wrt_x(ops):
    x, weight, bias, A = sample_inputs_graph_conv("cpu", requires_grad=True)[1][1]
    grad = torch.randn(3, 6, 7, 3, requires_grad=True)
    results = []
    for fn in (ops.graph_conv, reference.graph_conv):
        (gx,) = torch.autograd.grad(fn(x, weight, bias, A), x, grad, create_graph=True)
        results.append(torch.autograd.grad((gx * gx).sum(), (grad, weight, A)))
    for arg, a, e in zip(("grad", "weight", "A"), *results):
        assert_close_scaled(a, e, 1e-5, f"grad of grad_x wrt {arg}")
    (gw,) = torch.autograd.grad(ops.graph_conv(x, weight, bias, A), weight, grad, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward through the weight, bias or A gradients"):
        torch.autograd.grad(gw.sum(), x)


@pytest.mark.parametrize("device", DEVICES)
def test_graph_conv_opcheck(ops, device):
    for index in (0, 1):
        x, weight, bias, A = sample_inputs_graph_conv(device, requires_grad=True)[index][1]
        grad = torch.randn(x.shape[0], weight.shape[0] // A.shape[0], *x.shape[2:], device=device)
        opcheck(torch.ops.skelemix.graph_conv_triton.default, (x, weight, bias, A))
        opcheck(torch.ops.skelemix._graph_conv_backward_weight_triton.default, (grad, x, A))
        opcheck(torch.ops.skelemix._graph_conv_backward_adjacency_triton.default, (grad, x, weight, bias, A))


@interpreted
def test_graph_conv_errors(ops):
    x, weight, bias, A = sample_inputs_graph_conv("cpu")[0][1]
    op = torch.ops.skelemix.graph_conv_triton
    with pytest.raises(RuntimeError, match=r"graph_conv_triton: A must have shape \(K, 25, 25\)"):
        op(x, weight, bias, A[:, :3])
    with pytest.raises(RuntimeError, match=r"graph_conv_triton: weight must have shape \(K \* C_out, 3\) with K = 3"):
        op(x, weight[:, :2], bias, A)
    with pytest.raises(RuntimeError, match=r"graph_conv_triton: bias must have shape \(12,\)"):
        op(x, weight, bias[:5], A)
    with pytest.raises(RuntimeError, match="graph_conv_triton: A must match x's dtype and device"):
        op(x, weight, bias, A.half())
    with pytest.raises(RuntimeError, match="impl='triton' takes float32, float16 or bfloat16 x; got torch.float64"):
        op(x.double(), weight.double(), bias.double(), A.double())



# -------------------------------------------------------------------------------------------------- bn_epilogue


def sample_inputs_bn_epilogue(device, dtype=torch.float32):
    """(name, args) cases of ``bn_epilogue(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p, relu)``:
    batch and fixed statistics, each stage on and off, odd and tile-crossing sizes, 2-D and non-contiguous x."""
    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    def case(shape, residual=True, fixed=False, p=0.0, relu=True, x=None, res=None):
        C = shape[1]
        x = 1.5 * t(*shape) + 0.5 if x is None else x  # off-centre, not unit variance
        res = (t(*shape) if residual else None) if res is None else res
        stats = (torch.randn(C, device=device), torch.rand(C, device=device) + 0.5) if fixed else (None, None)
        seed = torch.randint(-2**63, 2**63 - 1, (1,), device=device)  # both 32-bit halves random, sign included
        return (x, torch.rand(C, device=device) + 0.5, torch.randn(C, device=device), res, *stats, seed, 1e-5, p,
                relu)

    x_perm = (1.5 * t(2, 6, 5, 4) + 0.5).permute(0, 3, 1, 2)  # (2, 4, 6, 5) from a (N, T, V, C) buffer
    res_t = t(2, 4, 5, 6).transpose(2, 3)
    return [
        ("batch_all_stages", case((3, 3, 25, 7), p=0.3)),  # odd shape: C=3, L=25*7
        ("fixed_all_stages", case((3, 3, 25, 7), fixed=True, p=0.3)),
        ("batch_dropout_residual", case((2, 4, 9, 5), p=0.5, relu=False)),
        ("fixed_dropout_only", case((2, 4, 9, 5), fixed=True, p=0.2, relu=False, residual=False)),
        ("batch_plain", case((4, 5, 6, 3), residual=False, relu=False)),
        ("fixed_relu_only", case((4, 5, 6, 3), fixed=True, residual=False)),
        ("two_d", case((6, 5), p=0.4)),  # (N, C): one cell per row
        ("crosses_tiles", case((2, 3, 1100), p=0.1, relu=False)),  # L > BLOCK_L: two blocks / reduction steps
        ("non_contiguous", case((2, 4, 6, 5), p=0.3, x=x_perm, res=res_t)),
        ("empty_batch", case((0, 3, 4, 5), fixed=True, p=0.3)),
    ]


def bn_grads(fn, args, grad):
    """``fn(*args)`` = (y, mean, var) and the gradients of ``(y * grad).sum()`` w.r.t. x, weight, bias and
    residual (the ones given)."""
    inputs = [a for a in args[:4] if a is not None]
    y, mean, var = fn(*args)
    return (y, mean, var), torch.autograd.grad(y, inputs, grad)


def leaves(args, dtype=None):
    """Fresh leaves of x, weight, bias, residual (x and residual cast to dtype); the rest as they are."""
    x, weight, bias, res, *rest = args
    x, res = (None if a is None else a.detach().to(dtype or a.dtype) for a in (x, res))
    fresh = tuple(None if a is None else a.detach().clone().requires_grad_() for a in (x, weight, bias, res))
    return fresh + tuple(rest)


def assert_dropout_mask(y, args, name):
    """Where no ReLU follows, an element is dropped exactly when y equals the residual (0 without one): the
    kernel's Philox mask must be the reference's bit for bit."""
    x, res, seed, p, relu = args[0], args[3], args[6], args[8], args[9]
    if p == 0 or relu or y.numel() == 0:
        return
    dropped = y == (res if res is not None else 0)
    keep = reference.dropout_keep(seed, x.shape, p)
    assert torch.equal(dropped, ~keep), f"{name}: {int((dropped == keep).sum())} dropout decisions differ"


@pytest.mark.parametrize("device", DEVICES)
def test_bn_epilogue_fp32_forward_backward(ops, device):
    for name, args in sample_inputs_bn_epilogue(device):
        args = leaves(args)
        dims = list(range(args[0].dim()))[::-1]
        grad = torch.randn(args[0].shape[::-1], device=device).permute(dims)  # non-contiguous
        poison_allocator(args[0].numel(), torch.float32, device)
        (y, mean, var), grads = bn_grads(ops.bn_epilogue, args, grad)
        (want_y, want_mean, want_var), want = bn_grads(reference.bn_epilogue, args, grad)
        assert_close_scaled(y, want_y, 1e-5, f"{name} y")
        if args[4] is None:  # batch statistics: returned, never differentiable
            assert_close_verbose(mean, want_mean, 1e-5, 1e-7, name=f"{name} mean")
            assert_close_verbose(var, want_var, 1e-5, 1e-7, name=f"{name} var")
            assert not mean.requires_grad and not var.requires_grad, name
        else:
            assert mean.shape == var.shape == (0,), name
        assert_dropout_mask(y, args, name)
        for arg, g, w in zip(("x", "weight", "bias", "residual"), grads, want):
            assert_close_scaled(g, w, 1e-5, f"{name} grad {arg}")


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_bn_epilogue_low_precision(ops, device, dtype):
    # y and grad_x/grad_residual are rounded to dtype once; grad_weight/grad_bias stay fp32. The rule: error
    # against the fp32 reference <= 2 x the eager reference's own error in dtype + 1e-3 x the largest entry.
    for name, args in sample_inputs_bn_epilogue(device)[:4]:
        a32, a, ae = leaves(args), leaves(args, dtype), leaves(args, dtype)
        grad = torch.randn(args[0].shape, device=device)
        (ref, *_), ref_grads = bn_grads(reference.bn_epilogue, a32, grad)
        (y, mean, var), grads = bn_grads(ops.bn_epilogue, a, grad.to(dtype))
        (eager, eager_mean, _), eager_grads = bn_grads(reference.bn_epilogue, ae, grad.to(dtype))
        assert y.dtype == dtype and mean.dtype == torch.float32, name
        assert_low_precision(y, eager, ref, 1e-3 * ref.abs().max().item(), f"{name} {dtype} y")
        if a[4] is None:  # the statistics of the same rounded x
            assert_close_verbose(mean, eager_mean, 1e-5, 1e-6, name=f"{name} {dtype} mean")
        assert_dropout_mask(y, a, f"{name} {dtype}")
        for arg, g, e, r in zip(("x", "weight", "bias", "residual"), grads, eager_grads, ref_grads):
            assert g.dtype == e.dtype, f"{name} grad {arg}"
            assert_low_precision(g, e, r, 1e-3 * r.abs().max().item(), f"{name} {dtype} grad {arg}")


@interpreted
@pytest.mark.parametrize("index", [0, 1], ids=["batch", "fixed"])
def test_bn_epilogue_backward_output_mask(ops, index):
    """Each output of the backward op alone equals the full call's (the kernels run in other combinations:
    grad_residual from the reduction or from the elementwise pass); unrequested outputs are empty."""
    x, weight, bias, res, stats_mean, stats_var, seed, eps, p, relu = sample_inputs_bn_epilogue("cpu")[index][1]
    y, mean, var = ops.bn_epilogue(x, weight, bias, res, stats_mean, stats_var, seed, eps, p, relu)
    if stats_mean is not None:
        mean, var = stats_mean, stats_var
    grad = torch.randn_like(x)
    op = torch.ops.skelemix._bn_epilogue_backward_triton

    def call(mask):
        return op(grad, x, y, weight, mean, var, seed, eps, p, relu, stats_mean is None, mask)

    full = call([True] * 4)
    for mask in ([True, False, False, False], [False, True, False, False], [False, False, True, False],
                 [False, False, False, True], [False, True, False, True], [True, False, True, True]):
        for i, (out, want) in enumerate(zip(call(mask), full)):
            if mask[i]:
                assert torch.equal(out, want), f"{mask}: output {i}"
            else:
                assert out.shape == (0,), f"{mask}: unrequested output {i} has shape {tuple(out.shape)}"


@pytest.mark.parametrize("device", DEVICES)
def test_bn_epilogue_dropout_mask_beyond_2_32(ops, device):
    """The kernels' mask (tl.randint, Triton's Philox4x32-10) equals reference.dropout_keep bit for bit at flat
    indices a (C, T, V)-sized test cannot reach: the high 32 bits of the index are the second counter word."""
    import triton

    kb = ops._kernels("bn_epilogue")
    near = torch.arange(-64, 64) + (1 << 32)
    idx = torch.cat([torch.arange(64), near, near + (5 << 32), torch.randint(0, 1 << 62, (256,))])
    for seed_value, p in ((0x0123456789ABCDEF, 0.3), (-2, 0.5), (2**32 - 1, 0.9), (-2**63, 0.1)):
        seed = torch.tensor([seed_value])
        threshold = reference.dropout_threshold(p)
        out = torch.empty(idx.shape, dtype=torch.int8, device=device)
        kb.dropout_keep_kernel[(triton.cdiv(idx.numel(), 128),)](seed.to(device), idx.to(device), out, idx.numel(),
                                                                 threshold, BLOCK=128)
        out = out.cpu()
        assert torch.equal(out.bool(), reference.dropout_bits(seed, idx) >= threshold), f"seed {seed_value:#x}"
        assert torch.equal(out[:64].bool(), reference.dropout_keep(seed, (64,), p)), f"seed {seed_value:#x}"
        assert torch.equal(out[64:192].bool(), reference.dropout_keep(seed, (128,), p, offset=(1 << 32) - 64)), (
            f"seed {seed_value:#x}")


@pytest.mark.parametrize("device", DEVICES)
def test_bn_epilogue_opcheck(ops, device):
    for index in (0, 1, 3):  # batch with residual, fixed, fixed without residual
        x, weight, bias, res, stats_mean, stats_var, seed, eps, p, relu = sample_inputs_bn_epilogue(device)[index][1]
        args = (x, weight.requires_grad_(), bias.requires_grad_(), res, stats_mean, stats_var, seed, eps, p, relu)
        opcheck(torch.ops.skelemix.bn_epilogue_triton.default, args)
        y, mean, var = ops.bn_epilogue(*args)
        batch = stats_mean is None
        if not batch:
            mean, var = stats_mean, stats_var
        opcheck(torch.ops.skelemix._bn_epilogue_backward_triton.default,
                (torch.randn_like(x), x, y.detach(), weight.detach(), mean.detach(), var.detach(), seed, eps, p, relu,
                 batch, [True, True, False, res is not None]))


@interpreted
def test_bn_epilogue_double_backward_raises(ops):
    args = leaves(sample_inputs_bn_epilogue("cpu")[0][1])
    y, _, _ = ops.bn_epilogue(*args)
    (gx,) = torch.autograd.grad(y.square().sum(), args[0], create_graph=True)
    with pytest.raises(NotImplementedError, match="bn_epilogue_triton: double backward"):
        torch.autograd.grad(gx.sum(), args[0])


@interpreted
@pytest.mark.parametrize("bad, match", [
    (lambda a: (a[0].double(), *a[1:]), "impl='triton' takes float32, float16 or bfloat16 x; got torch.float64"),
    (lambda a: (a[0][0, 0, 0], *a[1:]), r"x must be at least 2-D \(N, C, \*\); got shape \[7\]"),
    (lambda a: (a[0], a[1][:2], *a[2:]), r"weight must have shape \(3,\) \(the channels of x"),
    (lambda a: (*a[:2], a[2].double(), *a[3:]), "bias must be torch.float32 .* got torch.float64"),
    (lambda a: (*a[:3], a[3][:1], *a[4:]), r"residual must have the shape of x \[3, 3, 25, 7\]"),
    (lambda a: (*a[:4], a[1], None, *a[6:]), "stats_mean and stats_var must both be given"),
    (lambda a: (*a[:6], a[6].int(), *a[7:]), "seed must be an int64 tensor of one element; got torch.int32"),
    (lambda a: (*a[:7], -1.0, *a[8:]), "eps must be >= 0"),
    (lambda a: (*a[:8], 1.0, a[9]), r"p \(dropout probability\) must be in \[0, 1\); got 1.0"),
])
def test_bn_epilogue_errors(ops, bad, match):
    args = sample_inputs_bn_epilogue("cpu")[0][1]
    with pytest.raises(RuntimeError, match="skelemix::bn_epilogue_triton: " + match):
        ops.bn_epilogue(*bad(args))



@pytest.mark.parametrize("device", DEVICES)
def test_bn_epilogue_compile_fullgraph(ops, device):
    """Dynamo traces forward and backward without graph breaks (backend as in the test below)."""
    backend = "eager" if _extension.triton_interpret() else "inductor"
    for name, args in sample_inputs_bn_epilogue(device)[:2]:  # batch and fixed statistics
        args = leaves(args)

        def fn(*args):
            y, mean, _ = torch.ops.skelemix.bn_epilogue_triton(*args)
            return y.square().sum(), mean

        compiled = torch.compile(fn, fullgraph=True, backend=backend)
        (loss, mean), (want_loss, want_mean) = compiled(*args), fn(*args)
        inputs = [a for a in args[:4] if a is not None]
        for g, w in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(want_loss, inputs)):
            assert_close_scaled(g, w, 1e-5, f"{name} compiled grad")
        assert_close_scaled(loss, want_loss, 1e-5, f"{name} compiled loss")
        assert torch.equal(mean, want_mean), name

@pytest.mark.needs_cuda
def test_bn_epilogue_cuda_graph_capture(ops):
    """The seed is read on the device (no .item()): forward and backward replay in a CUDA graph, and a new seed
    copied into the captured tensor gives the new mask."""
    args = leaves(sample_inputs_bn_epilogue("cuda")[2][1])  # dropout, residual, no ReLU
    x, seed = args[0], args[6]
    side = torch.cuda.Stream()  # warm up (compile every kernel) on a side stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.autograd.grad(ops.bn_epilogue(*args)[0].square().sum(), x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, _, _ = ops.bn_epilogue(*args)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
    for value in (12345, -987654321987):
        seed.fill_(value)
        graph.replay()
        want_y = reference.bn_epilogue(*args)[0]
        (want_gx,) = torch.autograd.grad(want_y.square().sum(), x)
        assert_close_scaled(y, want_y, 1e-5, f"seed {value} y")
        assert_close_scaled(gx, want_gx, 1e-5, f"seed {value} grad x")
        assert_dropout_mask(y, args, f"seed {value}")


# ----------------------------------------------------------------------------------- torch.compile, models


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_traces_the_triton_ops(ops, device):
    """Dynamo traces all three ops without graph breaks. Under the interpreter only the "eager" backend works
    (AOTAutograd cannot trace interpreted kernels, see opcheck above); on a GPU Inductor compiles them."""
    backend = "eager" if _extension.triton_interpret() else "inductor"
    x, weight, bias, A = sample_inputs_graph_conv(device, requires_grad=True)[0][1]
    mask = torch.rand(1, 16, 25, device=device) < 0.5
    gather_args = sample_inputs_gather(device)[0][1]

    def fn(x, weight, bias, A, mask, gather_args):
        y = torch.ops.skelemix.graph_conv_triton(x, weight, bias, A)
        pooled = torch.ops.skelemix.mask_pool_triton(y, mask)
        mixed, region = torch.ops.skelemix.skelemix_gather_triton(*gather_args)
        return pooled.square().sum(), mixed, region

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    loss, mixed, region = compiled(x, weight, bias, A, mask, gather_args)
    grads = torch.autograd.grad(loss, (x, weight, bias, A))
    want_loss, want_mixed, want_region = fn(x, weight, bias, A, mask, gather_args)
    want_grads = torch.autograd.grad(want_loss, (x, weight, bias, A))
    assert_close_scaled(loss, want_loss, 1e-5, "compiled loss")
    for g, w in zip(grads, want_grads):
        assert_close_scaled(g, w, 1e-5, "compiled grad")
    assert torch.equal(mixed, want_mixed) and torch.equal(region, want_region)


@interpreted
def test_encoder_matches_eager(ops):
    from skelemix.models import STGCN

    torch.manual_seed(0)
    # Both with fused epilogues (impl="eager": its reference), so both draw the same Philox dropout masks.
    eager = STGCN(hidden_channels=4, hidden_dim=16, impl="eager", fused_epilogue=True)
    triton_enc = STGCN(hidden_channels=4, hidden_dim=16, impl="triton", fused_epilogue=True)
    triton_enc.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 16, 25, 2)
    mask = torch.rand(2, 4, 25) < 0.5
    outs = []
    for enc in (eager, triton_enc):
        torch.manual_seed(1)  # the same dropout draws
        p, c = enc(x, mask)
        loss = (p * torch.linspace(-1, 1, p.shape[1])).sum() + c.square().sum()
        loss.backward()
        outs.append((p, c, {n: q.grad for n, q in enc.named_parameters()}))
    assert_close_scaled(outs[1][0], outs[0][0], 1e-5, "p")
    assert_close_scaled(outs[1][1], outs[0][1], 1e-5, "c")
    assert_grads_close(outs[1][2], outs[0][2])


def assert_grads_close(grads, want):
    """rtol 1e-4 with an atol of 1e-5 x the largest gradient entry of the model: a conv bias before a BatchNorm
    has a zero true gradient, so its entries are pure rounding noise at that scale."""
    assert grads.keys() == want.keys()
    scale = max(g.abs().max().item() for g in want.values())
    for name, g in want.items():
        assert_close_verbose(grads[name], g, 1e-4, 1e-5 * scale, name=f"grad {name}")


@interpreted
def test_training_step_matches_eager(ops):
    from skelemix.models import SkeleMixCLR

    cfg = dict(feature_dim=8, queue_size=64, swap_params=((2, 3, 2, 3, 1, 1.0),))
    x = torch.randn(4, 3, 16, 25, 1)
    key = x + 0.01 * torch.randn_like(x)
    results = []
    for impl in ("eager", "triton"):
        torch.manual_seed(0)
        model = SkeleMixCLR(encoder=dict(hidden_channels=4, hidden_dim=16, impl=impl, fused_epilogue=True), **cfg)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(1)  # the same dropout draws
        out = model(x, key, generator=torch.Generator().manual_seed(1))
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.encoder_q.named_parameters() if p.grad is not None}
        optimizer.step()
        results.append((out, grads, dict(model.encoder_q.named_parameters()), model.queue.clone()))
    (eager_out, eager_grads, eager_params, eager_queue), (out, grads, params, queue) = results
    for name in ("loss", "loss_ins", "loss_p", "loss_c"):
        assert_close_scaled(out[name], eager_out[name], 1e-5, name)
    assert len(grads) == len(params)
    assert_grads_close(grads, eager_grads)
    scale = max(g.abs().max().item() for g in eager_grads.values())
    for name, p in eager_params.items():  # one SGD step of lr 0.1 apart by at most lr x the gradient tolerance
        assert_close_verbose(params[name], p, 1e-5, 0.1 * 1e-4 * scale, name=f"updated {name}")
    assert_close_scaled(queue, eager_queue, 1e-5, "queue")


# ------------------------------------------------------------------------------------- GPU compile, no GPU


def test_kernels_compile_for_hopper():
    """Every kernel (all forward autotune configs) compiles to an sm_90 cubin, GPU or not: catches what the
    interpreter does not check (layouts of tl.reshape/tl.dot, shared memory, register spills are not run)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_compile_check.py")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "FAILED" not in res.stdout, res.stdout + res.stderr
    assert res.stdout.count("ok ") >= 3 * 8, res.stdout  # 8 kernels x 3 dtypes at least


def test_launch_settings_are_pure_and_bounded(ops):
    km, kg, kc, kb = (ops._kernels(n) for n in ("mask_pool", "skelemix_gather", "graph_conv", "bn_epilogue"))
    assert km.settings(256, 16 * 25) == (8, 512, 8)  # (BLOCK_C, BLOCK_S, num_warps): 4096-element tiles
    assert kg.settings(3 * 64, 25 * 2) == (64, 64, 8)
    assert kc.padded_joints(25) == 32 and kc.padded_joints(3) == 16
    with pytest.raises(ValueError, match="at most 128 joints"):
        kc.padded_joints(129)
    with pytest.raises(ValueError, match="more than 65535 programs"):
        km.settings(1 << 25, 4)
    assert kb.settings(256 * 64, 75 * 25) == (4, 1024, 8)  # (BLOCK_R, BLOCK_L, num_warps): 4096-element tiles
    assert kb.settings(256, 1) == (256, 16, 8)  # (N, C) input: tiles of rows
    with pytest.raises(ValueError, match="bn_epilogue .* more than 65535 programs"):
        kb.settings(4, 1 << 27)
    block_c, block_i, block_t, split, _ = kc.reduction_settings(32, 64, 64, lambda bt, bc: 1000, lambda bc, bi: 6,
                                                                interpret=False)
    assert (block_c, block_i, block_t) == (32, 32, 2) and split == 512 // 6
    assert kc.reduction_settings(32, 64, 64, lambda bt, bc: 1000, lambda bc, bi: 6, False, target=8 * 132)[3] == 176
    # The fixed forward config (no autotuning): channel tiles fitted to the layer, within the register budget.
    for cin, cout in ((3, 16), (16, 16), (64, 256), (256, 64)):
        config = kc.fwd_config(32, cin, cout, interpret=False)
        assert config["BLOCK_C"] == min(64, max(16, cout)) and config["BLOCK_I"] == min(32, max(16, cin))
        assert kc.fits_registers(config["BLOCK_C"], config["BLOCK_T"], 32) and config["num_stages"] == 2
    assert kc.fwd_config(32, 64, 256, interpret=False) == dict(BLOCK_C=64, BLOCK_I=32, BLOCK_T=4, num_warps=8,
                                                               num_stages=2)


def test_graph_conv_autotunes_only_when_asked(ops, monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.delenv(ops.AUTOTUNE_ENV, raising=False)
    assert not ops._autotune(x)
    monkeypatch.setenv(ops.AUTOTUNE_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops._autotune(x)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert not ops._autotune(mode.from_tensor(x))  # inside a trace: the fixed config
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not ops._autotune(x)
