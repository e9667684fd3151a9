"""Triton kernels of ``skelemix::bn_epilogue`` (registered in :mod:`skelemix.ops._triton`).

``x`` is viewed as contiguous ``(R = N*C, L)`` rows (``L`` = the product of the dims after the channels), so row
``r`` belongs to channel ``r % C`` and element ``(r, l)`` has the flat index ``r * L + l``, the Philox counter of
its dropout bits. Every kernel owns a ``(BLOCK_R, BLOCK_L)`` tile of rows x cells; the per-channel vectors (statistics,
scale, gradient coefficients) come from the launcher in fp32.

Forward: one elementwise pass ``relu?(((x - mean) * a + bias) * keep / (1 - p) + residual)``.
Backward (formulas in csrc/bn_epilogue.h): a reduction pass writes, per row, the fp32 sums of ``gp`` and
``gp * xhat`` to an ``(R,)`` buffer that the launcher sums over the batch (deterministic, no atomics), and can
write ``grad_residual`` on the way; an elementwise pass then writes ``grad_x`` (and ``grad_residual`` when no
reduction ran). The dropout mask is regenerated from ``(seed, index)`` in both, never stored;
``dropout_keep_kernel`` evaluates it at given indices (for tests).
"""
from __future__ import annotations

import triton
import triton.language as tl

MAX_GRID_YZ = 65535  # CUDA's limit on the 2nd and 3rd grid dimensions


def settings(rows: int, cells: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_L, num_warps)`` for ``rows`` rows of ``cells`` cells: a tile of at most 4096 elements,
    as wide along the contiguous cells as they go (coalesced loads). The elementwise kernels put the cell blocks
    on grid axis 1, so ``cells`` is bounded by CUDA's 65535 programs there."""
    block_l = min(max(triton.next_power_of_2(cells), 16), 1024)
    block_r = min(max(triton.next_power_of_2(rows), 1), max(4096 // block_l, 1))
    if triton.cdiv(cells, block_l) > MAX_GRID_YZ:
        raise ValueError(f"bn_epilogue (triton): {cells} elements per (sample, channel) need more than "
                         f"{MAX_GRID_YZ} programs along grid axis 1; use impl='eager' or 'cuda'")
    num_warps = 8 if block_r * block_l >= 4096 else 4
    return block_r, block_l, num_warps


@triton.jit
def _keep(seed_ptr, i, threshold):
    """skelemix.reference.dropout_keep at int64 flat indices ``i``: ``tl.randint(seed, i)`` is word 0 of
    Philox4x32-10 with key = the seed's two 32-bit halves and counter = (i's two halves, 0, 0), the reference's
    dropout_bits. The seed is read on the device (no host sync, so the op can be captured in a CUDA graph)."""
    bits = tl.randint(tl.load(seed_ptr), i)  # uint32
    return bits.to(tl.int64) >= threshold  # zero-extended: threshold may be 2**32 - 1


@triton.jit
def bn_epilogue_fwd_kernel(
    x_ptr,  # (R, L) contiguous input
    res_ptr,  # (R, L) contiguous residual (read when HAS_RES)
    y_ptr,  # (R, L) contiguous output
    mean_ptr, a_ptr, bias_ptr,  # (C,) fp32 mean, weight * rsqrt(var + eps), bias
    seed_ptr,  # (1,) int64 dropout seed (read when DROPOUT)
    R, C, L,  # rows (N*C), channels, cells per row
    threshold,  # keep iff the element's 32 random bits >= threshold (skelemix.reference.dropout_threshold(p))
    keep_scale,  # 1 / (1 - p)
    HAS_RES: tl.constexpr, DROPOUT: tl.constexpr, RELU: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_L: tl.constexpr,  # cells per program
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    l = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    r_ok = r < R
    c = r % C
    ok = r_ok[:, None] & (l < L)[None, :]
    i = r[:, None] * L + l[None, :]
    mean = tl.load(mean_ptr + c, mask=r_ok, other=0.0)
    a = tl.load(a_ptr + c, mask=r_ok, other=0.0)
    bias = tl.load(bias_ptr + c, mask=r_ok, other=0.0)
    x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
    out = (x - mean[:, None]) * a[:, None] + bias[:, None]
    if DROPOUT:
        out = out * tl.where(_keep(seed_ptr, i, threshold), keep_scale, 0.0)
    if HAS_RES:
        out += tl.load(res_ptr + i, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        out = tl.where(out < 0, 0.0, out)  # NaN passes, as in torch.relu (tl.maximum would give 0)
    tl.store(y_ptr + i, out.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grad_pre(g_ptr, y_ptr, seed_ptr, i, ok, threshold, keep_scale, DROPOUT: tl.constexpr, RELU: tl.constexpr):
    """(gu, gp): the gradient after the ReLU (= grad_residual) and before the dropout, in fp32."""
    gu = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        y = tl.load(y_ptr + i, mask=ok, other=0.0).to(tl.float32)
        gu = tl.where(y <= 0, 0.0, gu)  # a NaN y passes the gradient, as in torch.relu's backward
    gp = gu
    if DROPOUT:
        gp = gu * tl.where(_keep(seed_ptr, i, threshold), keep_scale, 0.0)
    return gu, gp


@triton.jit
def bn_epilogue_bwd_reduce_kernel(
    g_ptr,  # (R, L) contiguous gradient of y
    x_ptr,  # (R, L) contiguous forward input
    y_ptr,  # (R, L) contiguous forward output (read when RELU)
    gres_ptr,  # (R, L) contiguous grad_residual (written when WRITE_RES)
    sum_gp_ptr, sum_gpx_ptr,  # (R,) fp32 per-row sums of gp and gp * xhat
    mean_ptr, invstd_ptr,  # (C,) fp32 statistics the forward used, rsqrt(var + eps)
    seed_ptr,  # (1,) int64 dropout seed (read when DROPOUT)
    R, C, L,  # rows (N*C), channels, cells per row
    threshold, keep_scale,  # as in the forward
    DROPOUT: tl.constexpr, RELU: tl.constexpr, WRITE_RES: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_L: tl.constexpr,  # cells per loop step
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    c = r % C
    mean = tl.load(mean_ptr + c, mask=r_ok, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=r_ok, other=0.0)
    acc_gp = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
    acc_gpx = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        ok = r_ok[:, None] & (l < L)[None, :]
        i = r[:, None] * L + l[None, :]
        gu, gp = _grad_pre(g_ptr, y_ptr, seed_ptr, i, ok, threshold, keep_scale, DROPOUT, RELU)
        if WRITE_RES:
            tl.store(gres_ptr + i, gu.to(gres_ptr.dtype.element_ty), mask=ok)
        x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
        acc_gp += gp
        acc_gpx += gp * ((x - mean[:, None]) * invstd[:, None])
    tl.store(sum_gp_ptr + r, tl.sum(acc_gp, axis=1), mask=r_ok)
    tl.store(sum_gpx_ptr + r, tl.sum(acc_gpx, axis=1), mask=r_ok)


@triton.jit
def bn_epilogue_bwd_kernel(
    g_ptr,  # (R, L) contiguous gradient of y
    x_ptr,  # (R, L) contiguous forward input (read when BATCH_STATS)
    y_ptr,  # (R, L) contiguous forward output (read when RELU)
    gx_ptr,  # (R, L) contiguous grad_x (written when WRITE_X)
    gres_ptr,  # (R, L) contiguous grad_residual (written when WRITE_RES)
    mean_ptr, invstd_ptr, a_ptr,  # (C,) fp32 mean, rsqrt(var + eps), weight * invstd
    cb_ptr, cw_ptr,  # (C,) fp32 grad_bias / n and grad_weight / n (read when BATCH_STATS)
    seed_ptr,  # (1,) int64 dropout seed (read when DROPOUT)
    R, C, L,  # rows (N*C), channels, cells per row
    threshold, keep_scale,  # as in the forward
    DROPOUT: tl.constexpr, RELU: tl.constexpr, BATCH_STATS: tl.constexpr,
    WRITE_X: tl.constexpr, WRITE_RES: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_L: tl.constexpr,  # cells per program
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    l = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    r_ok = r < R
    c = r % C
    ok = r_ok[:, None] & (l < L)[None, :]
    i = r[:, None] * L + l[None, :]
    gu, gp = _grad_pre(g_ptr, y_ptr, seed_ptr, i, ok, threshold, keep_scale, DROPOUT, RELU)
    if WRITE_RES:
        tl.store(gres_ptr + i, gu.to(gres_ptr.dtype.element_ty), mask=ok)
    if WRITE_X:
        a = tl.load(a_ptr + c, mask=r_ok, other=0.0)
        if BATCH_STATS:
            # The gradient through the batch mean and variance: a * (gp - sum gp / n - xhat * sum gp*xhat / n).
            mean = tl.load(mean_ptr + c, mask=r_ok, other=0.0)
            invstd = tl.load(invstd_ptr + c, mask=r_ok, other=0.0)
            cb = tl.load(cb_ptr + c, mask=r_ok, other=0.0)
            cw = tl.load(cw_ptr + c, mask=r_ok, other=0.0)
            x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
            xhat = (x - mean[:, None]) * invstd[:, None]
            gp = gp - cb[:, None] - xhat * cw[:, None]
        tl.store(gx_ptr + i, (a[:, None] * gp).to(gx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def dropout_keep_kernel(
    seed_ptr,  # (1,) int64 dropout seed
    idx_ptr,  # (n,) int64 flat element indices
    out_ptr,  # (n,) bool (int8) output: kept
    n,  # number of indices
    threshold,  # as in the forward
    BLOCK: tl.constexpr,  # indices per program
):
    """The forward's dropout mask at arbitrary flat indices: lets tests check it beyond 2**32 elements."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = j < n
    i = tl.load(idx_ptr + j, mask=ok, other=0)
    tl.store(out_ptr + j, _keep(seed_ptr, i, threshold).to(tl.int8), mask=ok)
