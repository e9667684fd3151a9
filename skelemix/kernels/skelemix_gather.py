"""Triton kernel of ``skelemix::skelemix_gather`` and its launcher (the op is registered in
:mod:`skelemix.ops.skelemix_gather`).

One program per (output sample ``r*N + n``, block of ``(c, t)`` rows, block of ``(v, m)`` columns) copies each
element from the partner or from the sample itself; the region (joints x block span) is evaluated per element
from the tiny ``joints``/``span`` tables, so no frame-resolution mask is ever materialised.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch, tile


def settings(rows: int, cols: int) -> tuple[int, int, int]:
    """``(BLOCK_ROW, BLOCK_COL, num_warps)`` for a ``(rows = C*T, cols = V*M)`` sample (columns up to 256)."""
    return tile("skelemix_gather", f"C*T={rows} and V*M={cols}", rows, cols, 256)


@triton.jit
def skelemix_gather_kernel(
    x_ptr,  # (N, C*T, V*M) contiguous input
    partner_ptr,  # (R, N) contiguous int64 partner of every sample
    joints_ptr,  # (R, G, V) contiguous bool joints of each region
    span_ptr,  # (R, G, 2) contiguous int64 [start, end) in blocks
    out_ptr,  # (R*N, C*T, V*M) contiguous mixed output
    N, T, M, ROWS, COLS,  # samples, frames, bodies, C*T, V*M
    block,  # frames per temporal block
    region_r, region_n,  # region index = r * region_r + n * region_n: (G, 1), or (1, 0) when G == 1
    V,  # joints
    BLOCK_ROW: tl.constexpr,  # (c, t) rows per program
    BLOCK_COL: tl.constexpr,  # (v, m) columns per program
):
    rn = tl.program_id(0).to(tl.int64)
    r = rn // N
    n = rn % N
    row = tl.program_id(1) * BLOCK_ROW + tl.arange(0, BLOCK_ROW)
    col = tl.program_id(2) * BLOCK_COL + tl.arange(0, BLOCK_COL)
    row_ok = row < ROWS
    col_ok = col < COLS
    group = r * region_r + n * region_n  # index of the (r, g) region
    start = tl.load(span_ptr + group * 2)
    end = tl.load(span_ptr + group * 2 + 1)
    p = tl.load(partner_ptr + rn)
    p = tl.where((p >= 0) & (p < N), p, n)  # unchecked values (check_values=False) must not read out of bounds
    t_block = (row % T) // block
    in_time = (t_block >= start) & (t_block < end)
    in_joints = tl.load(joints_ptr + group * V + col // M, mask=col_ok, other=0).to(tl.int1)
    take = in_time[:, None] & in_joints[None, :]
    src = tl.where(take, p, n)
    offs = row.to(tl.int64)[:, None] * COLS + col[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    val = tl.load(x_ptr + src * ROWS * COLS + offs, mask=ok)
    tl.store(out_ptr + rn * ROWS * COLS + offs, val, mask=ok)


def gather(x: torch.Tensor, partner: torch.Tensor, joints: torch.Tensor, span: torch.Tensor,
           block: int) -> torch.Tensor:
    """The ``(R*N, C, T, V, M)`` mixed batches of ``x`` (the region mask is the caller's)."""
    N, C, T, V, M = x.shape
    R, G = joints.shape[:2]
    out = torch.empty((R * N, C, T, V, M), dtype=x.dtype, device=x.device)
    if out.numel():
        rows, cols = C * T, V * M
        block_row, block_col, num_warps = settings(rows, cols)
        region_r, region_n = (G, 1) if G > 1 else (1, 0)
        launch(skelemix_gather_kernel, (R * N, triton.cdiv(rows, block_row), triton.cdiv(cols, block_col)),
               x.contiguous(), partner.contiguous(), joints.contiguous(), span.contiguous(), out, N, T, M, rows, cols,
               block, region_r, region_n, V, BLOCK_ROW=block_row, BLOCK_COL=block_col, num_warps=num_warps)
    return out
