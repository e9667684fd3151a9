"""Triton kernels of ``skelemix::mask_pool`` (registered in :mod:`skelemix.ops._triton`).

Forward: one program per (row b, block of channels) streams the ``T*V`` cells of its rows once and keeps two
fp32 sums, inside and outside the mask (not the total minus the inside, which cancels when the inside dominates,
as with post-ReLU features). Backward: one program per (row, channel block, cell block) writes
``grad[b, 0|1, c] / count`` into each cell. The per-mask True counts come from the launcher (one tiny torch
reduction), so neither kernel has to recount the mask.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAX_GRID_YZ = 65535  # CUDA's limit on the 2nd and 3rd grid dimensions


def settings(channels: int, cells: int) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_S, num_warps)`` for ``channels`` channels of ``cells = T*V`` cells: a tile of at most
    4096 elements, as wide along the contiguous cells as they go (coalesced loads)."""
    block_s = min(max(triton.next_power_of_2(cells), 16), 1024)
    block_c = min(max(triton.next_power_of_2(channels), 1), max(4096 // block_s, 1))
    if triton.cdiv(channels, block_c) > MAX_GRID_YZ or triton.cdiv(cells, block_s) > MAX_GRID_YZ:
        raise ValueError(f"mask_pool (triton): C={channels} channels and T*V={cells} cells need more than "
                         f"{MAX_GRID_YZ} programs along one grid dimension; use impl='eager' or 'cuda'")
    num_warps = 8 if block_c * block_s >= 4096 else 4
    return block_c, block_s, num_warps


@triton.jit
def mask_pool_fwd_kernel(
    x_ptr,  # (B, C, T*V) contiguous input
    mask_ptr,  # (G, T*V) contiguous bool mask
    count_ptr,  # (G,) int32 number of True cells of each mask
    out_ptr,  # (B, 2, C) contiguous output in x's dtype
    C, S,  # channels, cells (T*V)
    rows_per_mask,  # B // G: row b uses mask b // rows_per_mask
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_S: tl.constexpr,  # cells per loop step
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    g = b // rows_per_mask
    c_ok = c < C
    row = x_ptr + b * C * S + c.to(tl.int64)[:, None] * S
    inside = tl.zeros((BLOCK_C,), dtype=tl.float32)
    outside = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < S
        m = tl.load(mask_ptr + g * S + s, mask=s_ok, other=0).to(tl.int1)
        v = tl.load(row + s[None, :], mask=c_ok[:, None] & s_ok[None, :], other=0.0).to(tl.float32)
        inside += tl.sum(tl.where(m[None, :], v, 0.0), axis=1)
        outside += tl.sum(tl.where(m[None, :], 0.0, v), axis=1)
    n_in = tl.load(count_ptr + g)
    n_out = S - n_in
    # An empty region pools to 0: its sum is 0, so dividing by max(count, 1) gives 0.
    p = inside / tl.maximum(n_in, 1).to(tl.float32)
    q = outside / tl.maximum(n_out, 1).to(tl.float32)
    dst = out_ptr + b * 2 * C + c
    tl.store(dst, p.to(out_ptr.dtype.element_ty), mask=c_ok)
    tl.store(dst + C, q.to(out_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def mask_pool_bwd_kernel(
    grad_ptr,  # (B, 2, C) incoming gradient, any strides
    mask_ptr,  # (G, T*V) contiguous bool mask
    count_ptr,  # (G,) int32 number of True cells of each mask
    out_ptr,  # (B, C, T*V) contiguous gradient of x
    C, S,  # channels, cells (T*V)
    rows_per_mask,  # B // G
    stride_gb, stride_gr, stride_gc,  # strides of grad
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_S: tl.constexpr,  # cells per program
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
    g = b // rows_per_mask
    c_ok = c < C
    s_ok = s < S
    n_in = tl.load(count_ptr + g)
    src = grad_ptr + b * stride_gb + c.to(tl.int64) * stride_gc
    g_in = tl.load(src, mask=c_ok, other=0.0).to(tl.float32) / tl.maximum(n_in, 1).to(tl.float32)
    g_out = tl.load(src + stride_gr, mask=c_ok, other=0.0).to(tl.float32) / tl.maximum(S - n_in, 1).to(tl.float32)
    m = tl.load(mask_ptr + g * S + s, mask=s_ok, other=0).to(tl.int1)
    val = tl.where(m[None, :], g_in[:, None], g_out[:, None])
    dst = out_ptr + b * C * S + c.to(tl.int64)[:, None] * S + s[None, :]
    tl.store(dst, val.to(out_ptr.dtype.element_ty), mask=c_ok[:, None] & s_ok[None, :])
