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
from skelemix.testing import assert_close_verbose, sample_inputs_mask_pool, tolerances

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
    eager = STGCN(hidden_channels=4, hidden_dim=16, impl="eager")
    triton_enc = STGCN(hidden_channels=4, hidden_dim=16, impl="triton")
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
        model = SkeleMixCLR(encoder=dict(hidden_channels=4, hidden_dim=16, impl=impl), **cfg)
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
    assert res.stdout.count("ok ") >= 3 * 5, res.stdout  # 5 kernels x 3 dtypes at least


def test_launch_settings_are_pure_and_bounded(ops):
    km, kg, kc = (ops._kernels(n) for n in ("mask_pool", "skelemix_gather", "graph_conv"))
    assert km.settings(256, 16 * 25) == (8, 512, 8)  # (BLOCK_C, BLOCK_S, num_warps): 4096-element tiles
    assert kg.settings(3 * 64, 25 * 2) == (64, 64, 8)
    assert kc.padded_joints(25) == 32 and kc.padded_joints(3) == 16
    with pytest.raises(ValueError, match="at most 128 joints"):
        kc.padded_joints(129)
    with pytest.raises(ValueError, match="more than 65535 programs"):
        km.settings(1 << 25, 4)
    block_c, block_i, block_t, split, _ = kc.reduction_settings(32, 64, 64, lambda bt, bc: 1000, lambda bc, bi: 6,
                                                                interpret=False)
    assert (block_c, block_i, block_t) == (32, 32, 2) and split == 512 // 6
