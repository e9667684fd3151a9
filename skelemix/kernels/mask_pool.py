"""Triton kernels of ``skelemix::mask_pool`` and their launchers (the ops are registered in
:mod:`skelemix.ops.mask_pool`).

Forward: one program per (row b, block of channels) streams the ``T*V`` cells of its rows once and keeps two
fp32 sums, inside and outside the mask (not the total minus the inside, which cancels when the inside dominates,
as with post-ReLU features). Backward: one program per (row, channel block, cell block) writes
``grad[b, 0|1, c] / count`` into each cell. The per-mask True counts come from the launcher (one tiny torch
reduction), so neither kernel has to recount the mask.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch, result_dtype, tile


def settings(channels: int, cells: int) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_S, num_warps)`` for ``channels`` channels of ``cells = T*V`` cells."""
    return tile("mask_pool", f"C={channels} channels and T*V={cells} cells", channels, cells, 1024)


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


def _flat_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(G, T*V)`` contiguous mask and its ``(G,)`` int32 counts of True cells (one tiny torch reduction)."""
    flat = mask.reshape(mask.shape[0], -1).contiguous()
    return flat, flat.sum(1, dtype=torch.int32)


def forward(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, 2, C)`` means of ``x (B, C, T, V)`` inside and outside ``mask (G, T, V)``."""
    B, C, T, V = x.shape
    out = torch.empty((B, 2, C), dtype=result_dtype(x.dtype), device=x.device)
    if B * C:
        flat, counts = _flat_mask(mask)
        block_c, block_s, num_warps = settings(C, T * V)
        launch(mask_pool_fwd_kernel, (B, triton.cdiv(C, block_c)), x.contiguous(), flat, counts, out, C, T * V,
               B // mask.shape[0], BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps)
    return out.to(x.dtype)


def backward(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The gradient ``(B, C, T, V)`` of :func:`forward`'s input from ``grad (B, 2, C)``, any strides."""
    B, _, C = grad.shape
    G, T, V = mask.shape
    S = T * V
    out = torch.empty((B, C, T, V), dtype=result_dtype(grad.dtype), device=grad.device)
    if out.numel():
        flat, counts = _flat_mask(mask)
        block_c, block_s, num_warps = settings(C, S)
        launch(mask_pool_bwd_kernel, (B, triton.cdiv(C, block_c), triton.cdiv(S, block_s)), grad, flat, counts, out,
               C, S, B // G, *grad.stride(), BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps)
    return out.to(grad.dtype)
