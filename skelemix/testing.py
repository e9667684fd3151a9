"""The test kit shared by tests/ and bench/ (so the two never drift): which implementations run where, sample
inputs, tolerances and the comparison rules, gradients, and the poisoned allocator.

Importing it needs no pytest; the functions that build pytest parameters import pytest when called. The
tolerances are those of the self-check's parity probe (:mod:`skelemix.parity`), so tests and ``impl=auto`` agree.
"""
from __future__ import annotations

import importlib
from typing import NamedTuple, Sequence

import torch

from . import _extension
from .parity import OPS, TOLERANCES, tolerances  # noqa: F401 (the kit's, shared with the self-check)

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
# The compiled implementations and the devices they run on; Triton on CPU tensors runs in Triton's interpreter.
IMPL_DEVICES = (("cpp", "cpu"), ("cuda", "cuda"), ("triton", "cpu"), ("triton", "cuda"))


class Sample(NamedTuple):
    """One call of an op: ``fn(*args)``; ``name`` identifies the case in failure messages."""

    name: str
    args: tuple


# ----------------------------------------------------------------------------- implementations x devices x dtypes


def impl_cases(impls: Sequence[str] = ("cpp", "cuda", "triton"), dtypes: Sequence[torch.dtype] | None = None,
               devices: Sequence[str] = ("cpu", "cuda"), triton_float64: bool = False) -> list:
    """pytest parameters ``(impl, device)``, or ``(impl, device, dtype)`` with ``dtypes``, for the implementations
    ``impls`` on ``devices``. Marks skip what cannot run here (``needs_impl``, ``needs_cuda``); Triton on CPU
    tensors is marked ``triton_interpret`` (CI runs those with ``-m triton_interpret``); Triton has no float64 case
    (the Triton ops refuse it) unless ``triton_float64`` (a copy takes it)."""
    import pytest

    cases = []
    for impl, device in IMPL_DEVICES:
        if impl not in impls or device not in devices:
            continue
        marks = [pytest.mark.needs_impl(impl)] + [pytest.mark.needs_cuda] * (device == "cuda")
        interpreted = impl == "triton" and device == "cpu"
        marks += [pytest.mark.triton_interpret] * interpreted
        name = "triton-interpret" if interpreted else "triton-cuda" if impl == "triton" else impl
        for dtype in dtypes or [None]:
            if impl == "triton" and dtype == torch.float64 and not triton_float64:
                continue
            extra = () if dtype is None else (dtype,)
            cases.append(pytest.param(impl, device, *extra, marks=marks, id="-".join([name, *map(_short, extra)])))
    return cases


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def raw_ops(impl: str, *names: str) -> list:
    """The ops ``torch.ops.skelemix.<name>`` of ``impl``: the C++ ops for ``cpp`` and ``cuda``; for ``triton``
    ``<name>_triton``, registered first (as running an op through its wrapper does)."""
    if impl == "triton":
        from .ops._impl import register_triton_once

        for op in OPS:
            register_triton_once(op, importlib.import_module(f"skelemix.ops.{op}")._register_triton)
        names = tuple(f"{name}_triton" for name in names)
    return [getattr(torch.ops.skelemix, name) for name in names]


def opcheck(op, args) -> None:
    """``torch.library.opcheck``; for a Triton op in the interpreter without the AOTAutograd test, which needs
    traceable kernels (``wrap_triton`` passes interpreted kernels through untraced)."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if op.name().endswith("_triton") and _extension.triton_interpret():
        utils = utils[:-1]
    torch.library.opcheck(op, args, test_utils=utils)


def compile_backend(impl: str) -> str:
    """The ``torch.compile`` backend an op test uses: ``aot_eager`` (forward and backward traced through the fake
    kernels, without Inductor's slow CPU codegen); for Triton Inductor on a GPU, and ``eager`` (Dynamo alone) in
    the interpreter, which AOTAutograd cannot trace."""
    if impl == "triton":
        return "eager" if _extension.triton_interpret() else "inductor"
    return "aot_eager"


# ------------------------------------------------------------------------------------- tolerances and rules

def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "",
                        atol: float = 0.0) -> None:
    """``rtol`` elementwise plus an atol of ``rtol`` x the largest expected value (+ ``atol``): sums of many
    products cancel to near-zero entries, whose error is only meaningful at the operands' scale."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    assert_close_verbose(actual, expected, rtol, rtol * scale + atol, name=name)


def assert_at_most_twice_eager(actual: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor, atol: float,
                               name: str) -> None:
    """FlashAttention's rule for low precision: against a more precise ``oracle`` (float64 or float32), the
    kernel's largest error is at most twice the largest error of the eager reference run in the kernel's dtype,
    plus ``atol``."""
    assert not actual.isnan().any(), f"{name}: NaN"
    err = (actual.double() - oracle.double()).abs().max().item() if actual.numel() else 0.0
    eager_err = (eager.double() - oracle.double()).abs().max().item() if eager.numel() else 0.0
    assert err <= 2 * eager_err + atol, f"{name}: error {err:.3g} > 2 x eager error {eager_err:.3g} + {atol:.3g}"


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """The same bits (NaN payloads and -0 included) in the same shape and dtype."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{name}: {tuple(actual.shape)} {actual.dtype} != expected {tuple(expected.shape)} {expected.dtype}")
    if actual.dtype.is_floating_point:
        actual, expected = actual.view(_BITS[actual.element_size()]), expected.view(_BITS[expected.element_size()])
    bad = actual != expected
    assert not bool(bad.any()), (f"{name}: {int(bad.sum())} of {bad.numel()} elements differ; first at "
                                 f"{tuple(bad.nonzero()[0].tolist())}")


# ----------------------------------------------------------------------------------- gradients and inputs


def grads(out: torch.Tensor, inputs: Sequence, grad_out: torch.Tensor) -> list:
    """The gradients of ``(out * grad_out).sum()`` for every input that requires grad, None for the others (and
    for inputs that are not tensors)."""
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True) if wanted else ())
    return [next(got) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs]


def leaves(args: Sequence, dtype: torch.dtype | None = None, cast: Sequence[int] | None = None,
           requires_grad: bool | None = None) -> list:
    """Fresh copies of a sample's arguments: floating tensors detached and made leaves that require grad as the
    originals did (or as ``requires_grad`` says), the ones at the indices ``cast`` (default: all) cast to
    ``dtype``; the rest as they are."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            to = dtype if dtype is not None and (cast is None or i in cast) else a.dtype
            a = a.detach().to(to).clone().requires_grad_(a.requires_grad if requires_grad is None else requires_grad)
        out.append(a)
    return out


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, name: str = "",
                         max_report: int = 5) -> None:
    """Like ``torch.testing.assert_close`` (NaNs never match) but lists the first mismatching indices."""
    where = f"{name}: " if name else ""
    assert actual.shape == expected.shape, f"{where}shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{where}dtype {actual.dtype} != expected {expected.dtype}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~((a - e).abs() <= atol + rtol * e.abs())  # NaN compares False, so it is reported
    if not bool(bad.any()):
        return
    idx = bad.nonzero()[:max_report]
    rows = [f"  {tuple(i.tolist())}: actual {a[tuple(i)].item():.8g}, expected {e[tuple(i)].item():.8g}" for i in idx]
    nan = int(a.isnan().sum())
    raise AssertionError(
        f"{where}{int(bad.sum())} of {bad.numel()} elements differ (rtol={rtol}, atol={atol}, NaNs in actual: "
        f"{nan}, max abs diff {(a - e).abs().nan_to_num(float('inf')).max().item():.3g}); first:\n" + "\n".join(rows))


def poison_allocator(numel: int, dtype: torch.dtype, device) -> None:
    """Free a NaN-filled block of an output's size just before an op allocates that output. The CUDA caching
    allocator hands the block to the op's next allocation (glibc malloc often does for mid-sized blocks), so a
    kernel that skips elements shows NaNs. Random, NaN-free inputs compared with the reference catch the rest."""
    block = torch.full((max(numel, 1),), float("nan"), dtype=dtype, device=device)
    del block


def perturb_state(module: torch.nn.Module) -> None:
    """Move every weight and BatchNorm statistic off its initial value, so a weight that is silently not
    loaded (or loaded into the wrong place) changes the outputs."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point() and not name.endswith(("A", "queue")):
                t.add_(torch.randn_like(t) * 0.1)



# ------------------------------------------------------------------------------------------------- samples


def sample_inputs_mask_pool(device="cpu", dtype=torch.float32, requires_grad=False) -> list[Sample]:
    """Varied ``(x, mask)`` cases for :func:`skelemix.ops.mask_pool`, freshly drawn from the global RNG."""
    device = torch.device(device)

    def x_of(B, C, T, V):
        return torch.randn(B, C, T, V, device=device, dtype=dtype).requires_grad_(requires_grad)

    def mask_of(G, T, V, p=0.5):
        return torch.rand(G, T, V, device=device) < p

    # Non-contiguous: x from a (B, T, V, C) buffer, mask from a (G, V, T) one.
    x_perm = torch.randn(4, 6, 5, 3, device=device, dtype=dtype).permute(0, 3, 1, 2).requires_grad_(requires_grad)
    mask_t = mask_of(2, 5, 6).transpose(1, 2)
    return [
        Sample("shared_mask", (x_of(4, 3, 6, 5), mask_of(1, 6, 5))),
        Sample("per_sample_two_bodies", (x_of(6, 4, 8, 5), mask_of(3, 8, 5))),  # B = 2N, G = N
        Sample("odd_sizes", (x_of(3, 5, 7, 3), mask_of(3, 7, 3))),
        Sample("sparse_mask", (x_of(2, 3, 9, 11), mask_of(2, 9, 11, p=0.1))),
        Sample("one_cell", (x_of(2, 3, 1, 1), mask_of(1, 1, 1))),
        Sample("all_true", (x_of(2, 3, 4, 5), torch.ones(1, 4, 5, dtype=torch.bool, device=device))),
        Sample("all_false", (x_of(4, 2, 4, 5), torch.zeros(2, 4, 5, dtype=torch.bool, device=device))),
        Sample("non_contiguous", (x_perm, mask_t)),
        Sample("empty_batch", (x_of(0, 3, 4, 5), mask_of(1, 4, 5))),
    ]


def sample_inputs_skelemix_gather(device="cpu", dtype=torch.float32) -> list[Sample]:
    """Varied ``(x, partner, joints, span, block)`` cases for :func:`skelemix.ops.skelemix_gather`, freshly drawn
    from the global RNG. Partners may be the sample itself (the op allows it); spans include empty ones
    (``start == end``), whole ones and ones ending in a partial last block."""
    device = torch.device(device)

    def case(N, C, T, V, M, R, G, block, empty=False, full=False):
        blocks = -(-T // block)
        x = torch.randn(N, C, T, V, M, device=device, dtype=dtype)
        partner = torch.randint(0, max(N, 1), (R, N), device=device)
        if full:
            joints = torch.ones(R, G, V, dtype=torch.bool, device=device)
            span = torch.tensor([0, blocks], device=device).repeat(R, G, 1)
        else:
            joints = torch.rand(R, G, V, device=device) < 0.5
            start = torch.randint(0, blocks + 1, (R, G), device=device)
            end = start if empty else start + (torch.rand(R, G, device=device) * (blocks - start + 1)).long()
            span = torch.stack((start, end), dim=-1)
        return x, partner, joints, span, block

    # Non-contiguous: x from an (N, T, V, M, C) buffer, partner from (N, R), joints from (R, V, G), span from
    # (R, 2, G).
    x_nc, p_nc, j_nc, s_nc, _ = case(4, 3, 9, 25, 2, 2, 4, 2)
    non_contiguous = (x_nc.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3), p_nc.T.contiguous().T,
                      j_nc.transpose(1, 2).contiguous().transpose(1, 2),
                      s_nc.transpose(1, 2).contiguous().transpose(1, 2), 2)
    return [
        Sample("official_shared_region", case(4, 3, 16, 25, 2, 1, 1, 4)),
        Sample("t_not_multiple_of_block_v20_m1", case(3, 3, 10, 20, 1, 3, 1, 4)),
        Sample("per_sample_regions", case(5, 2, 9, 25, 2, 3, 5, 2)),
        Sample("wide_channels_short_t", case(2, 256, 3, 25, 2, 2, 2, 4)),
        Sample("block_1_v20_m2", case(3, 3, 7, 20, 2, 2, 1, 1)),
        Sample("empty_spans", case(3, 3, 8, 25, 1, 3, 3, 4, empty=True)),
        Sample("whole_sequence", case(3, 2, 11, 20, 2, 2, 1, 4, full=True)),
        Sample("non_contiguous", non_contiguous),
        Sample("one_sample", case(1, 3, 5, 25, 2, 3, 1, 4)),
        Sample("empty_batch", case(0, 3, 8, 25, 2, 2, 1, 4)),
        Sample("no_mixes", case(3, 3, 8, 25, 2, 0, 1, 4)),
    ]


def sample_inputs_graph_conv(device="cpu", dtype=torch.float32, requires_grad=False) -> list[Sample]:
    """Varied ``(x, weight, bias, A)`` cases for :func:`skelemix.ops.graph_conv`, freshly drawn from the global
    RNG. Both contraction orders of the kernels (A first when C_in <= C_out, the weight first otherwise), K = 1
    and 3, V = 17, 20 and 25, odd T, one frame, sizes past the Triton kernels' tiles, no bias, non-contiguous
    operands, an empty batch and, with ``requires_grad``, a case where only some inputs require grad."""
    device = torch.device(device)

    def t(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(requires_grad and grad)

    def adjacency(K, V, grad=True):
        # Non-negative like a normalised graph times edge importance, with rows of mixed size.
        return (torch.rand(K, V, V, device=device, dtype=dtype) / V * 3).requires_grad_(requires_grad and grad)

    def case(name, N, c_in, c_out, T, V, K, bias=True):
        return Sample(name, (t(N, c_in, T, V), t(K * c_out, c_in), t(K * c_out) if bias else None, adjacency(K, V)))

    # Non-contiguous x (from an (N, T, V, C) buffer), weight (transposed), bias (strided) and A (transposed per
    # subset).
    x_perm = torch.randn(3, 7, 20, 6, device=device, dtype=dtype).permute(0, 3, 1, 2).requires_grad_(requires_grad)
    w_t = torch.randn(6, 3 * 10, device=device, dtype=dtype).t().requires_grad_(requires_grad)
    b_s = torch.randn(2 * 3 * 10, device=device, dtype=dtype)[::2].requires_grad_(requires_grad)
    A_t = (torch.rand(3, 20, 20, device=device, dtype=dtype) / 7).transpose(1, 2).requires_grad_(requires_grad)
    return [
        case("typical", 4, 16, 16, 8, 25, 3),
        case("c_in_3_odd_t", 3, 3, 16, 9, 25, 3),
        case("c_out_256", 2, 8, 256, 3, 20, 3),
        case("weight_first", 2, 24, 8, 7, 20, 3),  # C_in > C_out
        case("k1_no_bias", 3, 5, 6, 11, 25, 1, bias=False),
        case("k3_no_bias_v20", 2, 6, 5, 5, 20, 3, bias=False),
        case("width_one", 2, 1, 1, 1, 1, 2),
        Sample("non_contiguous", (x_perm, w_t, b_s, A_t)),
        case("crosses_tiles", 1, 40, 70, 5, 25, 3),  # C_in, C_out and T past one tile of the Triton kernels
        case("one_frame", 2, 4, 3, 1, 17, 3),
        case("empty_batch", 0, 4, 6, 5, 25, 3),
        # Only x and A require grad (a frozen 1x1 conv); with requires_grad=False nothing does.
        Sample("mixed_requires_grad", (t(2, 5, 7, 25), t(3 * 9, 5, grad=False), t(3 * 9, grad=False),
                                       adjacency(3, 25))),
    ]


def sample_inputs_bn_epilogue(device="cpu", dtype=torch.float32, requires_grad=False) -> list[Sample]:
    """Varied ``(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p, relu)`` cases for
    :func:`skelemix.ops.bn_epilogue`, freshly drawn from the global RNG: batch and fixed statistics, with and
    without dropout, residual and ReLU, 2-D to 5-D, odd sizes, one channel, rows longer than a Triton tile,
    non-contiguous ``x`` and residual, an empty batch; ``x`` off-centre (mean 0.5, spread 1.5), seeds over the
    whole int64 range."""
    device = torch.device(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def t(*shape, kind="randn", dt=dtype):
        v = torch.randn(*shape, device=device, dtype=dt) if kind == "randn" else \
            torch.rand(*shape, device=device, dtype=dt) + 0.5
        return v.requires_grad_(requires_grad)

    def off_centre(*shape):
        return (1.5 * torch.randn(*shape, device=device) + 0.5).to(dtype)

    def case(shape, residual=False, stats=False, p=0.0, relu=True, x=None, res=None):
        C = shape[1]
        x = off_centre(*shape).requires_grad_(requires_grad) if x is None else x
        res = t(*shape) if residual and res is None else res
        seed = torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64, device=device)  # sign bit included
        fixed = (torch.randn(C, device=device, dtype=acc), torch.rand(C, device=device, dtype=acc) + 0.5) \
            if stats else (None, None)
        return (x, t(C, kind="rand", dt=acc), t(C, dt=acc), res, *fixed, seed, 1e-5, p, relu)

    x_perm = off_centre(3, 7, 5, 4).permute(0, 3, 1, 2).requires_grad_(requires_grad)
    res_t = torch.randn(3, 4, 5, 7, device=device, dtype=dtype).transpose(2, 3).requires_grad_(requires_grad)
    return [
        Sample("batch_stats_relu", case((4, 3, 6, 5))),
        Sample("batch_stats_dropout_residual", case((3, 5, 7, 6), residual=True, p=0.5)),
        Sample("fixed_stats_dropout_residual", case((3, 5, 7, 6), residual=True, stats=True, p=0.3)),
        Sample("no_relu_dropout_residual", case((2, 4, 9, 5), residual=True, p=0.2, relu=False)),
        Sample("fixed_stats_no_relu", case((2, 3, 4, 5), stats=True, relu=False)),
        Sample("three_d", case((5, 6, 11), p=0.5)),
        Sample("five_d_one_channel", case((3, 1, 4, 5, 2), residual=True, p=0.5)),
        Sample("non_contiguous", case((3, 4, 7, 5), residual=True, p=0.5, x=x_perm, res=res_t)),
        Sample("empty_batch", case((0, 3, 4, 5), stats=True)),
        Sample("two_d", case((6, 5), p=0.4)),  # (N, C): one cell per row
        Sample("crosses_tiles", case((2, 3, 1100), p=0.1, relu=False)),  # rows longer than one Triton tile
    ]
