"""Triton kernels of ``skelemix::graph_conv`` and their launchers (the ops are registered in
:mod:`skelemix.ops.graph_conv`).

``y[n, c, t, w] = sum_k sum_v (sum_i W[k*Cout + c, i] x[n, i, t, v] + b[k*Cout + c]) A[k, v, w]``.

Tiling (Hopper-oriented, two chained ``tl.dot``s per k): a program owns ``BLOCK_C`` output channels x
``BLOCK_T`` frames of one sample. For each k it forms ``h = W_k @ x`` as a ``(BLOCK_C, BLOCK_T * VP)`` tile
(columns = (t, v), V padded to a power of two VP >= 16), views it as ``(BLOCK_C * BLOCK_T, VP)`` and multiplies
by the ``(VP, VP)`` tile of ``A_k``, accumulating ``y`` in fp32. ``h`` never goes to memory. Padded joints are
harmless: ``A``'s padded rows load as 0. Every load is masked, so any shape works.

The input gradient is the same computation with ``W_k -> W_k^T`` and ``A_k -> A_k^T`` (the channel and joint
contractions act on different axes, so they commute): the launcher reuses the forward kernel through strides.
The weight/bias and adjacency gradients reduce over ``(n, t)``; they split that reduction over a second grid
axis into fp32 partial sums that the launcher adds (deterministic, no atomics).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import _extension
from ._launch import MAX_GRID_YZ, launch, result_dtype

MAX_V = 128  # the (VP, VP) adjacency tile and the fp32 accumulators must fit in registers
AUTOTUNE_ENV = "SKELEMIX_TRITON_AUTOTUNE"


def padded_joints(V: int) -> int:
    """VP: V rounded up to a power of two, at least 16 (tl.dot's minimum tile side)."""
    if V > MAX_V:
        raise ValueError(f"graph_conv (triton): at most {MAX_V} joints are supported; got V={V}")
    return max(16, triton.next_power_of_2(V))


def frames_per_tile(VP: int, columns: int = 64) -> int:
    """BLOCK_T so that a tile row holds about ``columns`` (t, v) cells (and BLOCK_T * 16 >= 16 rows)."""
    return max(1, columns // VP)


def _fwd_configs():
    # (BLOCK_C, BLOCK_I, BLOCK_T, num_warps, num_stages); pruned below by the register budget for VP.
    shapes = [(64, 32, 4, 8, 3), (64, 64, 2, 4, 3), (32, 32, 4, 4, 3), (32, 64, 2, 4, 2), (64, 32, 2, 4, 2),
              (128, 32, 2, 8, 3), (16, 32, 2, 4, 2)]
    return [triton.Config({"BLOCK_C": c, "BLOCK_I": i, "BLOCK_T": t}, num_warps=w, num_stages=s)
            for c, i, t, w, s in shapes]


def channel_block(channels: int, most: int) -> int:
    """A power-of-two channel tile between 16 (tl.dot's minimum) and ``most`` that wastes little on padding."""
    return min(most, max(16, triton.next_power_of_2(channels)))


def fits_registers(block_c: int, block_t: int, VP: int) -> bool:
    """The two fp32 accumulators (2 x BLOCK_C * BLOCK_T * VP) stay within 16K elements."""
    return block_c * block_t * VP <= 8192


def prune_fwd_configs(configs, named_args, **kwargs):
    """Drop the autotune tiles that exceed the register budget for VP."""
    VP = kwargs.get("VP", named_args.get("VP"))
    return [c for c in configs if fits_registers(c.kwargs["BLOCK_C"], c.kwargs["BLOCK_T"], VP)] or configs[-1:]


def fwd_config(VP: int, cin: int, cout: int, interpret: bool) -> dict:
    """The forward's launch settings without autotuning: a tile fitted to the channels, as many frames as the
    register budget allows (at most 4); wider under the interpreter, where programs run one after another."""
    block_c, block_i = channel_block(cout, 64), channel_block(cin, 32)
    if interpret:
        return dict(BLOCK_C=block_c, BLOCK_I=block_i, BLOCK_T=frames_per_tile(VP, 128))
    block_t = 4
    while block_t > 1 and not fits_registers(block_c, block_t, VP):
        block_t //= 2
    big = block_c * block_t * VP >= 8192
    return dict(BLOCK_C=block_c, BLOCK_I=block_i, BLOCK_T=block_t, num_warps=8 if big else 4, num_stages=2)


# Gradient reductions: programs per SM the split of the (n, t) reduction aims at (about 4 per SM of an H100 was
# latency-bound by the desk check's reading; bench/bench_graph_conv.py sweeps it on a GPU).
REDUCTION_PROGRAMS_PER_SM = 8


def reduction_settings(VP: int, cin: int, cout: int, items, programs, interpret: bool,
                       target: int = 512) -> tuple[int, ...]:
    """``(BLOCK_C, BLOCK_I, BLOCK_T, SPLIT, num_warps)`` for the gradient reductions. ``items(BLOCK_T, BLOCK_C)``
    counts the reduction steps and ``programs(BLOCK_C, BLOCK_I)`` the programs per split; SPLIT makes about
    ``target`` programs in all on a GPU (the launcher passes ``REDUCTION_PROGRAMS_PER_SM`` per SM), a few under
    the interpreter, where programs run one after another anyway."""
    block_c, block_i = channel_block(cout, 32), channel_block(cin, 32)
    block_t = frames_per_tile(VP, 128 if interpret else 64)
    target = 4 if interpret else target
    split = max(1, min(items(block_t, block_c), target // max(programs(block_c, block_i), 1), MAX_GRID_YZ))
    return block_c, block_i, block_t, split, 4


@triton.jit
def _mma(a, b, acc, DOT_FP32: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if DOT_FP32:  # Triton's interpreter multiplies raw bf16 bit patterns in tl.dot: compute in fp32 there
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if ALLOW_TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _narrow(h, dtype: tl.constexpr, DOT_FP32: tl.constexpr):
    """An fp32 intermediate rounded to the operand dtype of the next tl.dot (kept fp32 when DOT_FP32)."""
    if DOT_FP32:
        return h
    else:
        return h.to(dtype)


@triton.jit
def _h_tile(x_tile, w_k, b_k, c, c_ok, col_ok, CIN, s_xi, s_wc, s_wi, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
            ALLOW_TF32: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
            VP: tl.constexpr):
    """h_k = W_k x (+ b_k) for one tile as (BLOCK_C, BLOCK_T * VP) fp32: x_tile points at the tile's (t, v) columns
    of input channel 0, w_k at W_k (output channel c, input channel i at c * s_wc + i * s_wi), b_k at b_k."""
    h = tl.zeros((BLOCK_C, BLOCK_T * VP), dtype=tl.float32)
    for i0 in range(0, CIN, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        i_ok = i < CIN
        w = tl.load(w_k + c[:, None] * s_wc + i[None, :] * s_wi, mask=c_ok[:, None] & i_ok[None, :], other=0.0)
        xt = tl.load(x_tile + i[:, None] * s_xi, mask=i_ok[:, None] & col_ok[None, :], other=0.0)
        h = _mma(w, xt, h, DOT_FP32, ALLOW_TF32)
    if HAS_BIAS:
        h += tl.load(b_k + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    return h


@triton.jit
def graph_conv_fwd_kernel(
    x_ptr,  # (N, CIN, T, V) input, any strides
    w_ptr,  # weight: element (k, out c, in i) at k*s_wk + c*s_wc + i*s_wi
    b_ptr,  # bias (K*COUT,) contiguous, or a dummy when not HAS_BIAS
    a_ptr,  # adjacency: element (k, v, w) at k*s_ak + v*s_av + w*s_aw
    y_ptr,  # (N, COUT, T, V) contiguous output
    N, CIN, COUT, T, V, K,  # sizes
    s_xn, s_xi, s_xt, s_xv,  # strides of x
    s_wk, s_wc, s_wi,  # strides of the weight (see w_ptr)
    s_ak, s_av, s_aw,  # strides of the adjacency (see a_ptr)
    HAS_BIAS: tl.constexpr,  # add b[k*COUT + c] to h
    VP: tl.constexpr,  # V padded to a power of two >= 16
    DOT_FP32: tl.constexpr,  # interpreter with bf16: tl.dot in fp32
    ALLOW_TF32: tl.constexpr,  # fp32 inputs may use TF32 tensor cores (torch's float32 matmul precision)
    BLOCK_C: tl.constexpr,  # output channels per program
    BLOCK_I: tl.constexpr,  # input channels per tl.dot step
    BLOCK_T: tl.constexpr,  # frames per program
):
    t_tiles = tl.cdiv(T, BLOCK_T)
    pid = tl.program_id(0)
    n = (pid // t_tiles).to(tl.int64)
    t0 = (pid % t_tiles) * BLOCK_T
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < COUT
    # Columns of h: (t, v) cells of the tile.
    j = tl.arange(0, BLOCK_T * VP)
    jt = t0 + j // VP
    jv = j % VP
    col_ok = (jt < T) & (jv < V)
    x_base = x_ptr + n * s_xn + jt[None, :] * s_xt + jv[None, :] * s_xv
    vp = tl.arange(0, VP)
    a_ok = (vp[:, None] < V) & (vp[None, :] < V)
    acc = tl.zeros((BLOCK_C * BLOCK_T, VP), dtype=tl.float32)
    for k in range(K):
        h = _h_tile(x_base, w_ptr + k * s_wk, b_ptr + k * COUT, c, c_ok, col_ok, CIN, s_xi, s_wc, s_wi, HAS_BIAS,
                    DOT_FP32, ALLOW_TF32, BLOCK_C, BLOCK_I, BLOCK_T, VP)
        a = tl.load(a_ptr + k * s_ak + vp[:, None] * s_av + vp[None, :] * s_aw, mask=a_ok, other=0.0)
        h2 = tl.reshape(h, (BLOCK_C * BLOCK_T, VP))
        acc = _mma(_narrow(h2, a.dtype, DOT_FP32), a, acc, DOT_FP32, ALLOW_TF32)
    # Rows of acc: (c, t).
    r = tl.arange(0, BLOCK_C * BLOCK_T)
    rc = tl.program_id(1) * BLOCK_C + r // BLOCK_T
    rt = t0 + r % BLOCK_T
    ok = ((rc < COUT) & (rt < T))[:, None] & (vp[None, :] < V)
    dst = y_ptr + ((n * COUT + rc[:, None]) * T + rt[:, None]) * V + vp[None, :]
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=ok)


# The same kernel autotuned over _fwd_configs() (opt-in: see _autotune).
graph_conv_fwd_autotuned = triton.autotune(configs=_fwd_configs(), key=["CIN", "COUT", "V"],
                                           prune_configs_by={"early_config_prune": prune_fwd_configs})(
    graph_conv_fwd_kernel)


@triton.jit
def _g_tile(g_ptr, n, rc, rt, vp, COUT, T, V, s_gn, s_gc, s_gt, s_gv):
    """The (BLOCK_C * BLOCK_T, VP) tile of g[n] at rows (rc, rt) and joints vp, zero outside."""
    ok = ((rc < COUT) & (rt < T))[:, None] & (vp[None, :] < V)
    return tl.load(g_ptr + n * s_gn + rc[:, None] * s_gc + rt[:, None] * s_gt + vp[None, :] * s_gv, mask=ok, other=0.0)


@triton.jit
def _grad_h(g_ptr, a_ptr, n, k, rc, rt, vp, COUT, T, V, s_gn, s_gc, s_gt, s_gv, s_ak, s_av, s_aw,
            DOT_FP32: tl.constexpr, ALLOW_TF32: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
            VP: tl.constexpr):
    """dL/dh_k for one tile as (BLOCK_C, BLOCK_T * VP) fp32: g[n, c, t, :] @ A_k^T, rows (c, t) -> columns (t, v)."""
    g = _g_tile(g_ptr, n, rc, rt, vp, COUT, T, V, s_gn, s_gc, s_gt, s_gv)
    at = tl.load(a_ptr + k * s_ak + vp[None, :] * s_av + vp[:, None] * s_aw,  # (w, v) tile of A_k^T
                 mask=(vp[:, None] < V) & (vp[None, :] < V), other=0.0)
    gh = _mma(g, at, tl.zeros((BLOCK_C * BLOCK_T, VP), dtype=tl.float32), DOT_FP32, ALLOW_TF32)
    return tl.reshape(gh, (BLOCK_C, BLOCK_T * VP))


@triton.jit
def graph_conv_bwd_weight_kernel(
    g_ptr,  # (N, COUT, T, V) gradient of y, any strides
    x_ptr,  # (N, CIN, T, V) input, any strides
    a_ptr,  # (K, V, V) adjacency, any strides
    dw_ptr,  # (SPLIT, K*COUT, CIN) contiguous fp32 partial weight gradients
    db_ptr,  # (SPLIT, K*COUT) contiguous fp32 partial bias gradients
    N, CIN, COUT, T, V, K,  # sizes
    s_gn, s_gc, s_gt, s_gv,  # strides of g
    s_xn, s_xi, s_xt, s_xv,  # strides of x
    s_ak, s_av, s_aw,  # strides of A
    SPLIT,  # programs sharing the (n, t-tile) reduction
    VP: tl.constexpr,  # V padded to a power of two >= 16
    DOT_FP32: tl.constexpr,  # interpreter with bf16: tl.dot in fp32
    ALLOW_TF32: tl.constexpr,  # fp32 inputs may use TF32
    BLOCK_C: tl.constexpr,  # output channels per program
    BLOCK_I: tl.constexpr,  # input channels per program
    BLOCK_T: tl.constexpr,  # frames per reduction step
):
    c_tiles = tl.cdiv(COUT, BLOCK_C)
    i_tiles = tl.cdiv(CIN, BLOCK_I)
    pid = tl.program_id(0)
    k = pid // (c_tiles * i_tiles)
    pc = (pid // i_tiles) % c_tiles
    pi = pid % i_tiles
    split = tl.program_id(1)
    c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    i = pi * BLOCK_I + tl.arange(0, BLOCK_I)
    r = tl.arange(0, BLOCK_C * BLOCK_T)
    rc = pc * BLOCK_C + r // BLOCK_T
    vp = tl.arange(0, VP)
    j = tl.arange(0, BLOCK_T * VP)
    t_tiles = tl.cdiv(T, BLOCK_T)
    acc_w = tl.zeros((BLOCK_C, BLOCK_I), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for item in range(split, N * t_tiles, SPLIT):
        n = (item // t_tiles).to(tl.int64)
        t0 = (item % t_tiles) * BLOCK_T
        gh = _grad_h(g_ptr, a_ptr, n, k, rc, t0 + r % BLOCK_T, vp, COUT, T, V, s_gn, s_gc, s_gt, s_gv,
                     s_ak, s_av, s_aw, DOT_FP32, ALLOW_TF32, BLOCK_C, BLOCK_T, VP)
        acc_b += tl.sum(gh, axis=1)
        # (t, v) x i tile of x, transposed on load.
        jt = t0 + j // VP
        jv = j % VP
        xt = tl.load(x_ptr + n * s_xn + i[None, :] * s_xi + jt[:, None] * s_xt + jv[:, None] * s_xv,
                     mask=((jt < T) & (jv < V))[:, None] & (i < CIN)[None, :], other=0.0)
        acc_w = _mma(_narrow(gh, xt.dtype, DOT_FP32), xt, acc_w, DOT_FP32, ALLOW_TF32)
    c_ok = c < COUT
    row = (split.to(tl.int64) * K + k) * COUT + c  # row of the (SPLIT * K * COUT) partial sums
    tl.store(dw_ptr + row[:, None] * CIN + i[None, :], acc_w, mask=c_ok[:, None] & (i < CIN)[None, :])
    if pi == 0:
        tl.store(db_ptr + row, acc_b, mask=c_ok)


@triton.jit
def graph_conv_bwd_adjacency_kernel(
    g_ptr,  # (N, COUT, T, V) gradient of y, any strides
    x_ptr,  # (N, CIN, T, V) input, any strides
    w_ptr,  # (K*COUT, CIN) weight, any strides
    b_ptr,  # (K*COUT,) contiguous bias, or a dummy when not HAS_BIAS
    da_ptr,  # (SPLIT, K, V, V) contiguous fp32 partial adjacency gradients
    N, CIN, COUT, T, V,  # sizes
    s_gn, s_gc, s_gt, s_gv,  # strides of g
    s_xn, s_xi, s_xt, s_xv,  # strides of x
    s_wo, s_wi,  # strides of the weight
    SPLIT,  # programs sharing the (n, t-tile, c-tile) reduction
    HAS_BIAS: tl.constexpr,  # h includes the bias
    VP: tl.constexpr,  # V padded to a power of two >= 16
    DOT_FP32: tl.constexpr,  # interpreter with bf16: tl.dot in fp32
    ALLOW_TF32: tl.constexpr,  # fp32 inputs may use TF32
    BLOCK_C: tl.constexpr,  # output channels per reduction step
    BLOCK_I: tl.constexpr,  # input channels per tl.dot step
    BLOCK_T: tl.constexpr,  # frames per reduction step
):
    k = tl.program_id(0)
    split = tl.program_id(1)
    t_tiles = tl.cdiv(T, BLOCK_T)
    c_tiles = tl.cdiv(COUT, BLOCK_C)
    vp = tl.arange(0, VP)
    j = tl.arange(0, BLOCK_T * VP)
    r = tl.arange(0, BLOCK_C * BLOCK_T)
    acc = tl.zeros((VP, VP), dtype=tl.float32)
    for item in range(split, N * t_tiles * c_tiles, SPLIT):
        n = (item // (t_tiles * c_tiles)).to(tl.int64)
        t0 = ((item // c_tiles) % t_tiles) * BLOCK_T
        pc = item % c_tiles
        c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < COUT
        jt = t0 + j // VP
        jv = j % VP
        col_ok = (jt < T) & (jv < V)
        h = _h_tile(x_ptr + n * s_xn + jt[None, :] * s_xt + jv[None, :] * s_xv, w_ptr + k * COUT * s_wo,
                    b_ptr + k * COUT, c, c_ok, col_ok, CIN, s_xi, s_wo, s_wi, HAS_BIAS, DOT_FP32, ALLOW_TF32, BLOCK_C,
                    BLOCK_I, BLOCK_T, VP)
        h2 = tl.reshape(h, (BLOCK_C * BLOCK_T, VP))  # rows (c, t); padded rows meet zero rows of g
        rc = pc * BLOCK_C + r // BLOCK_T
        rt = t0 + r % BLOCK_T
        g = _g_tile(g_ptr, n, rc, rt, vp, COUT, T, V, s_gn, s_gc, s_gt, s_gv)
        acc = _mma(tl.trans(_narrow(h2, g.dtype, DOT_FP32)), g, acc, DOT_FP32, ALLOW_TF32)
    ok = (vp[:, None] < V) & (vp[None, :] < V)
    dst = da_ptr + ((split.to(tl.int64) * tl.num_programs(0) + k) * V + vp[:, None]) * V + vp[None, :]
    tl.store(dst, acc, mask=ok)


def _dot_flags(dtype: torch.dtype) -> dict:
    return {
        # Triton's interpreter multiplies raw bf16 bit patterns in tl.dot: there bf16 tiles go to fp32 first.
        "DOT_FP32": _extension.triton_interpret() and dtype == torch.bfloat16,
        # TF32 for fp32 only when torch.set_float32_matmul_precision allows it, as torch's own matmuls.
        "ALLOW_TF32": dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest",
    }


def _autotune(*tensors: torch.Tensor) -> bool:
    """Whether the forward autotunes: only when asked (``SKELEMIX_TRITON_AUTOTUNE=1``, as the op benchmarks do), never
    under the interpreter, in a trace or in a CUDA graph capture (autotuning runs and times every config)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return (os.environ.get(AUTOTUNE_ENV) == "1" and not _extension.triton_interpret()
            and not torch.compiler.is_compiling()
            and not any(isinstance(t, (FakeTensor, FunctionalTensor)) for t in tensors)
            and not (tensors[0].is_cuda and torch.cuda.is_current_stream_capturing()))


def _reduction_target(x: torch.Tensor) -> int:
    """Programs the gradient reductions aim at: ``REDUCTION_PROGRAMS_PER_SM`` per SM of x's GPU."""
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    return REDUCTION_PROGRAMS_PER_SM * sms


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor) -> torch.Tensor:
    """``(N, C_out, T, V)``, any strides; with the weight blocks and ``A`` transposed, the input gradient."""
    N, Cin, T, V = x.shape
    K = A.shape[0]
    Cout = weight.shape[0] // K
    y = torch.empty((N, Cout, T, V), dtype=result_dtype(x.dtype), device=x.device)
    if y.numel() == 0:
        return y.to(x.dtype)
    VP = padded_joints(V)
    b = bias.contiguous() if bias is not None else y  # y: a dummy pointer, never read without a bias
    if _autotune(x, weight, b, A, y):
        kernel, config = graph_conv_fwd_autotuned, {}
    else:
        kernel, config = graph_conv_fwd_kernel, fwd_config(VP, Cin, Cout, _extension.triton_interpret())

    def grid(meta):
        return N * triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(Cout, meta["BLOCK_C"])

    launch(kernel, grid, x, weight, b, A, y, N, Cin, Cout, T, V, K, *x.stride(), Cout * weight.stride(0),
           weight.stride(0), weight.stride(1), *A.stride(), HAS_BIAS=bias is not None, VP=VP, **_dot_flags(x.dtype),
           **config)
    return y.to(x.dtype)


def backward_weight(grad: torch.Tensor, x: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias gradients, from fp32 partial sums over the split ``(n, t)`` reduction."""
    (N, Cout, T, V), Cin, K = grad.shape, x.shape[1], A.shape[0]
    VP = padded_joints(V)
    block_c, block_i, block_t, split, num_warps = reduction_settings(
        VP, Cin, Cout, lambda bt, bc: N * triton.cdiv(T, bt),
        lambda bc, bi: K * triton.cdiv(Cout, bc) * triton.cdiv(Cin, bi), _extension.triton_interpret(),
        _reduction_target(x))
    programs = K * triton.cdiv(Cout, block_c) * triton.cdiv(Cin, block_i)
    dw = torch.zeros((split, K * Cout, Cin), dtype=torch.float32, device=x.device)
    db = torch.zeros((split, K * Cout), dtype=torch.float32, device=x.device)
    if programs:
        launch(graph_conv_bwd_weight_kernel, (programs, split), grad, x, A, dw, db, N, Cin, Cout, T, V, K,
               *grad.stride(), *x.stride(), *A.stride(), split, VP=VP, BLOCK_C=block_c, BLOCK_I=block_i,
               BLOCK_T=block_t, num_warps=num_warps, **_dot_flags(x.dtype))
    return dw.sum(0).to(x.dtype), db.sum(0).to(x.dtype)


def backward_adjacency(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       A: torch.Tensor) -> torch.Tensor:
    """The gradient of ``A``, from fp32 partial sums over the split ``(n, t, c)`` reduction."""
    (N, Cout, T, V), Cin, K = grad.shape, x.shape[1], A.shape[0]
    VP = padded_joints(V)
    block_c, block_i, block_t, split, num_warps = reduction_settings(
        VP, Cin, Cout, lambda bt, bc: N * triton.cdiv(T, bt) * triton.cdiv(Cout, bc), lambda bc, bi: K,
        _extension.triton_interpret(), _reduction_target(x))
    da = torch.zeros((split, K, V, V), dtype=torch.float32, device=x.device)
    b = bias.contiguous() if bias is not None else da  # da: a dummy pointer, never read without a bias
    if Cout:
        launch(graph_conv_bwd_adjacency_kernel, (K, split), grad, x, weight, b, da, N, Cin, Cout, T, V,
               *grad.stride(), *x.stride(), *weight.stride(), split, HAS_BIAS=bias is not None, VP=VP,
               BLOCK_C=block_c, BLOCK_I=block_i, BLOCK_T=block_t, num_warps=num_warps, **_dot_flags(x.dtype))
    return da.sum(0).to(x.dtype)
