"""Triton kernels of ``skelemix::bn_epilogue`` and their launchers (the ops are registered in
:mod:`skelemix.ops.bn_epilogue`).

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

import math

import torch
import triton
import triton.language as tl

from .. import reference
from ._launch import launch, result_dtype, tile


def settings(rows: int, cells: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_L, num_warps)`` for ``rows`` rows of ``cells`` cells. The elementwise kernels put the cell
    blocks on grid axis 1, so ``cells`` is bounded by CUDA's 65535 programs there."""
    return tile("bn_epilogue", f"{cells} elements per (sample, channel)", rows, cells, 1024, rows_on_yz=False)


@triton.jit
def _keep(seed_ptr, i, threshold):
    """skelemix.reference.dropout_keep at int64 flat indices ``i``: ``tl.randint(seed, i)`` is word 0 of
    Philox4x32-10 with key = the seed's two 32-bit halves and counter = (i's two halves, 0, 0), the reference's
    dropout_bits. The seed is read on the device (no host sync, so the op can be captured in a CUDA graph)."""
    bits = tl.randint(tl.load(seed_ptr), i)  # uint32
    return bits.to(tl.int64) >= threshold  # zero-extended: threshold may be 2**32 - 1


@triton.jit
def _tile(R, C, L, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """The elementwise kernels' (row block, cell block) tile: its rows' bounds and channels, the in-bounds mask and
    the int64 flat indices of its elements."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    l = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    r_ok = r < R
    return r_ok, r % C, r_ok[:, None] & (l < L)[None, :], r[:, None] * L + l[None, :]


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
    r_ok, c, ok, i = _tile(R, C, L, BLOCK_R, BLOCK_L)
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
    r_ok, c, ok, i = _tile(R, C, L, BLOCK_R, BLOCK_L)
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


def _dropout_args(p: float) -> tuple[int, float]:
    # (threshold, 1 / (1 - p)): plain numbers, so the seed is the only dropout state read on the device.
    return reference.dropout_threshold(p), 1.0 / (1.0 - p)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None,
            stats_mean: torch.Tensor | None, stats_var: torch.Tensor | None, seed: torch.Tensor, eps: float, p: float,
            relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, var)`` of :func:`skelemix.reference.bn_epilogue`: batch statistics by ``torch.var_mean`` in fp32,
    then one pass of :func:`bn_epilogue_fwd_kernel`."""
    N, C = x.shape[:2]
    L = math.prod(x.shape[2:])
    if stats_mean is None:
        var, mean = torch.var_mean(x.to(torch.float32), dim=[0, *range(2, x.dim())], correction=0)
        used_mean, used_var = mean, var
    else:
        used_mean, used_var = stats_mean, stats_var
        mean, var = (x.new_empty((0,), dtype=torch.float32) for _ in range(2))  # two: outputs may not alias
    a = weight * torch.rsqrt(used_var + eps)  # as the reference computes it
    y = torch.empty(x.shape, dtype=result_dtype(x.dtype), device=x.device)
    if y.numel():
        xc = x.contiguous()
        rc = residual.contiguous() if residual is not None else xc  # xc: a dummy pointer, never read
        threshold, keep_scale = _dropout_args(p)
        block_r, block_l, num_warps = settings(N * C, L)
        launch(bn_epilogue_fwd_kernel, (triton.cdiv(N * C, block_r), triton.cdiv(L, block_l)), xc, rc, y,
               used_mean.contiguous(), a, bias.contiguous(), seed, N * C, C, L, threshold, keep_scale,
               HAS_RES=residual is not None, DROPOUT=p > 0, RELU=relu, BLOCK_R=block_r, BLOCK_L=block_l,
               num_warps=num_warps)
    return y.to(x.dtype), mean, var


def backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
             var: torch.Tensor, seed: torch.Tensor, eps: float, p: float, relu: bool, batch_stats: bool,
             output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of x, weight, bias and residual that ``output_mask`` asks for (the others empty), from the
    reduction pass (the per-channel sums, and grad_residual on the way) and the elementwise pass."""
    want_x, want_w, want_b, want_res = output_mask
    N, C = x.shape[:2]
    L = math.prod(x.shape[2:])
    R, n = N * C, max(N * L, 1)
    gx = torch.empty(x.shape, dtype=result_dtype(x.dtype), device=x.device) if want_x else None
    gres = torch.empty(x.shape, dtype=result_dtype(x.dtype), device=x.device) if want_res else None
    # Per-row fp32 sums of gp and gp * xhat, summed over the batch below.
    need_sums = want_w or want_b or (want_x and batch_stats)
    sums = torch.zeros((2, N, C), dtype=torch.float32, device=x.device) if need_sums else None
    invstd = torch.rsqrt(var + eps)
    a = weight * invstd
    gc, xc, yc, mc = grad.contiguous(), x.contiguous(), y.contiguous(), mean.contiguous()
    threshold, keep_scale = _dropout_args(p)
    block_r, block_l, num_warps = settings(R, L)
    flags = dict(DROPOUT=p > 0, RELU=relu, BLOCK_R=block_r, BLOCK_L=block_l, num_warps=num_warps)
    if need_sums and R * L:
        launch(bn_epilogue_bwd_reduce_kernel, (triton.cdiv(R, block_r),), gc, xc, yc, gres if want_res else gc,
               sums[0], sums[1], mc, invstd, seed, R, C, L, threshold, keep_scale, WRITE_RES=want_res, **flags)
    gb, gw = (sums[0].sum(0), sums[1].sum(0)) if need_sums else (None, None)  # two reductions: no aliasing
    if (want_x or (want_res and not need_sums)) and R * L:
        cb, cw = (gb / n, gw / n) if want_x and batch_stats else (a, a)  # (a, a): dummies, never read
        launch(bn_epilogue_bwd_kernel, (triton.cdiv(R, block_r), triton.cdiv(L, block_l)), gc, xc, yc,
               gx if want_x else gc, gres if want_res else gc, mc, invstd, a, cb, cw, seed, R, C, L, threshold,
               keep_scale, BATCH_STATS=batch_stats, WRITE_X=want_x, WRITE_RES=want_res and not need_sums, **flags)

    def empty():  # a fresh one per output: outputs may not alias
        return x.new_empty((0,), dtype=torch.float32)

    return (gx.to(x.dtype) if want_x else empty(), gw if want_w else empty(), gb if want_b else empty(),
            gres.to(x.dtype) if want_res else empty())


def dropout_keep(seed: torch.Tensor, index: torch.Tensor, p: float) -> torch.Tensor:
    """The forward's dropout mask (bool, True = kept) at int64 flat indices ``index`` under ``seed``: lets tests
    reach indices beyond 2**32."""
    out = torch.empty(index.shape, dtype=torch.int8, device=index.device)
    if index.numel():
        launch(dropout_keep_kernel, (triton.cdiv(index.numel(), 128),), seed, index.contiguous(), out, index.numel(),
               reference.dropout_threshold(p), BLOCK=128)
    return out.bool()
