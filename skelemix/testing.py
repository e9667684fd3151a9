"""Sample inputs, tolerances and a verbose allclose, shared by tests/ and bench/ (so the two never drift)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Sample(NamedTuple):
    """One call of an op: ``fn(*args)``; ``name`` identifies the case in failure messages."""

    name: str
    args: tuple


# (rtol, atol) for comparing an implementation with the eager reference run in the same dtype. fp64 and fp32
# leave room only for a different summation order. fp16/bf16 allow about two roundings of the result (the
# reference rounds the sum and the mean separately; the kernels accumulate in fp32 and round once).
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (5e-3, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for ``dtype``; see :data:`TOLERANCES`."""
    return TOLERANCES[dtype]


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


def poison_allocator(numel: int, dtype: torch.dtype, device) -> None:
    """Free a NaN-filled block of an output's size just before an op allocates that output. The CUDA caching
    allocator hands the block to the op's next allocation (glibc malloc often does for mid-sized blocks), so a
    kernel that skips elements shows NaNs. Random, NaN-free inputs compared with the reference catch the rest."""
    block = torch.full((max(numel, 1),), float("nan"), dtype=dtype, device=device)
    del block


def require_impl(impl: str) -> None:
    """Skip the calling test when implementation ``impl`` cannot run here, saying why."""
    import pytest

    from . import _extension

    ok, why = _extension.available(impl)
    if not ok:
        pytest.skip(f"impl={impl!r} unavailable: {why}")


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


def perturb_state(module: torch.nn.Module) -> None:
    """Move every weight and BatchNorm statistic off its initial value, so a weight that is silently not
    loaded (or loaded into the wrong place) changes the outputs."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point() and not name.endswith(("A", "queue")):
                t.add_(torch.randn_like(t) * 0.1)


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
    and 3, V = 20 and 25, odd T, no bias, non-contiguous operands, an empty batch and, with ``requires_grad``,
    a case where only some inputs require grad."""
    device = torch.device(device)

    def t(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(requires_grad and grad)

    def adjacency(K, V, grad=True):
        # Non-negative like a normalised graph times edge importance, with rows of mixed size.
        return (torch.rand(K, V, V, device=device, dtype=dtype) / V * 3).requires_grad_(requires_grad and grad)

    def case(name, N, c_in, c_out, T, V, K, bias=True):
        return Sample(name, (t(N, c_in, T, V), t(K * c_out, c_in), t(K * c_out) if bias else None, adjacency(K, V)))

    # Non-contiguous x (from an (N, T, V, C) buffer), weight (transposed) and A (transposed per subset).
    x_perm = torch.randn(3, 7, 20, 6, device=device, dtype=dtype).permute(0, 3, 1, 2).requires_grad_(requires_grad)
    w_t = torch.randn(6, 3 * 10, device=device, dtype=dtype).t().requires_grad_(requires_grad)
    A_t = (torch.rand(3, 20, 20, device=device, dtype=dtype) / 7).transpose(1, 2).requires_grad_(requires_grad)
    return [
        case("typical", 4, 16, 16, 8, 25, 3),
        case("c_in_3_odd_t", 3, 3, 16, 9, 25, 3),
        case("c_out_256", 2, 8, 256, 3, 20, 3),
        case("weight_first", 2, 24, 8, 7, 20, 3),  # C_in > C_out
        case("k1_no_bias", 3, 5, 6, 11, 25, 1, bias=False),
        case("k3_no_bias_v20", 2, 6, 5, 5, 20, 3, bias=False),
        case("width_one", 2, 1, 1, 1, 1, 2),
        Sample("non_contiguous", (x_perm, w_t, t(3 * 10), A_t)),
        case("empty_batch", 0, 4, 6, 5, 25, 3),
        # Only x and A require grad (a frozen 1x1 conv); with requires_grad=False nothing does.
        Sample("mixed_requires_grad", (t(2, 5, 7, 25), t(3 * 9, 5, grad=False), t(3 * 9, grad=False),
                                       adjacency(3, 25))),
    ]


def sample_inputs_bn_epilogue(device="cpu", dtype=torch.float32, requires_grad=False) -> list[Sample]:
    """Varied ``(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p, relu)`` cases for
    :func:`skelemix.ops.bn_epilogue`, freshly drawn from the global RNG: batch and fixed statistics, with and
    without dropout, residual and ReLU, 3-D to 5-D, odd sizes, one channel, a non-contiguous ``x``, an empty batch."""
    device = torch.device(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def t(*shape, kind="randn", dt=dtype):
        v = torch.randn(*shape, device=device, dtype=dt) if kind == "randn" else \
            torch.rand(*shape, device=device, dtype=dt) + 0.5
        return v.requires_grad_(requires_grad)

    def case(shape, residual=False, stats=False, p=0.0, relu=True, x=None):
        C = shape[1]
        x = t(*shape) if x is None else x
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
        fixed = (torch.randn(C, device=device, dtype=acc), torch.rand(C, device=device, dtype=acc) + 0.5) \
            if stats else (None, None)
        return (x, t(C, kind="rand", dt=acc), t(C, dt=acc), t(*shape) if residual else None, *fixed, seed, 1e-5,
                p, relu)

    x_perm = torch.randn(3, 7, 5, 4, device=device, dtype=dtype).permute(0, 3, 1, 2).requires_grad_(requires_grad)
    return [
        Sample("batch_stats_relu", case((4, 3, 6, 5))),
        Sample("batch_stats_dropout_residual", case((3, 5, 7, 6), residual=True, p=0.5)),
        Sample("fixed_stats_dropout_residual", case((3, 5, 7, 6), residual=True, stats=True, p=0.3)),
        Sample("no_relu_dropout_residual", case((2, 4, 9, 5), residual=True, p=0.2, relu=False)),
        Sample("fixed_stats_no_relu", case((2, 3, 4, 5), stats=True, relu=False)),
        Sample("three_d", case((5, 6, 11), p=0.5)),
        Sample("five_d_one_channel", case((3, 1, 4, 5, 2), residual=True, p=0.5)),
        Sample("non_contiguous", case((3, 4, 7, 5), residual=True, p=0.5, x=x_perm)),
        Sample("empty_batch", case((0, 3, 4, 5), stats=True)),
    ]
