"""Triton implementations of the fused ops: ``torch.library.triton_op`` registrations of the kernels in
``kernels/`` (installed as :mod:`skelemix.kernels`).

Importing this module is cheap and never imports triton: the ops are registered by :func:`register`, which the
wrappers below call on first use (``skelemix.ops.<op>(..., impl="triton")`` ends up here). Call
:func:`register` once before ``torch.compile`` so that Dynamo does not have to trace the registration.

Ops (forward and backward are separate ``triton_op``s, so ``torch.compile`` sees every kernel):
``skelemix::mask_pool_triton`` and ``skelemix::_mask_pool_backward_triton`` (double backward exact: each is the
other's adjoint); ``skelemix::graph_conv_triton``, whose input gradient is ``graph_conv_triton`` itself with
transposed weight blocks and adjacency (so double backward w.r.t. x works), plus
``skelemix::_graph_conv_backward_weight_triton`` (weight and bias) and
``skelemix::_graph_conv_backward_adjacency_triton`` (no double backward: they raise);
``skelemix::skelemix_gather_triton`` (forward only, the (R, N) partner/joints/span schema); and
``skelemix::bn_epilogue_triton`` with ``skelemix::_bn_epilogue_backward_triton``, the schemas of the C++
``bn_epilogue`` and ``_bn_epilogue_backward`` (batch statistics by ``torch.var_mean`` in fp32, the rest in Triton;
the dropout seed is read on the device, so both can be captured in a CUDA graph; no double backward: it raises).
They take float32, float16 and bfloat16 (fp32 accumulation); float64 is refused rather than computed in fp32.

Under ``TRITON_INTERPRET=1`` the kernels run in Triton's CPU interpreter on CPU or CUDA tensors. There
``wrap_triton`` hands back the raw interpreted kernel, which needs real data: fake tensors (shape
propagation, ``opcheck``, Dynamo) skip the launch, and functionalized tracing (AOTAutograd, i.e. ``torch.compile``
with a backend other than ``"eager"``) raises, rather than silently compiling a graph without the kernel.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path

import torch

from .. import _extension

_REGISTERED = False
# Floating dtypes the kernels take: they accumulate in fp32, which would silently lose fp64 precision.
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels(name: str):
    """The module ``skelemix.kernels.<name>``. A source checkout put on ``sys.path`` (not installed) has no
    ``skelemix/kernels``: there the package is loaded from ``kernels/`` beside ``skelemix/``, as setup.py maps it."""
    if "skelemix.kernels" not in sys.modules and importlib.util.find_spec("skelemix.kernels") is None:
        root = Path(__file__).resolve().parents[2] / "kernels"
        spec = importlib.util.spec_from_file_location("skelemix.kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        if spec is None:
            raise ModuleNotFoundError(f"skelemix.kernels is not installed and {root} does not exist")
        package = importlib.util.module_from_spec(spec)
        sys.modules["skelemix.kernels"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"skelemix.kernels.{name}")


def _device(t: torch.Tensor):
    """Launch inside the tensor's device context (the current CUDA device picks the stream)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _no_data(*tensors: torch.Tensor) -> bool:
    """True when the launch must be skipped: interpreted kernels read real memory, which fake tensors lack."""
    if not _extension.triton_interpret():
        return False  # compiled kernels: wrap_triton traces them
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if any(isinstance(t, FunctionalTensor) for t in tensors):
        raise RuntimeError(
            "skelemix triton ops cannot be traced by AOTAutograd under TRITON_INTERPRET=1 (wrap_triton passes "
            "interpreted kernels through untraced); use torch.compile(backend='eager') or a GPU without "
            "TRITON_INTERPRET")
    return any(isinstance(t, FakeTensor) for t in tensors)


def _check_dtype(op: str, name: str, t: torch.Tensor) -> None:
    torch._check(t.dtype in _DTYPES, lambda: (
        f"{op}: impl='triton' takes float32, float16 or bfloat16 {name}; got {t.dtype} (use impl='eager', "
        "'cpp' or 'cuda' for it)"))


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the buffer a kernel writes a ``dtype`` result into. Triton's interpreter (3.8) rounds fp32 -> bf16
    toward zero, where GPUs round to nearest even: under it, bf16 results go to an fp32 buffer that torch
    rounds (``.to(dtype)``, a no-op otherwise)."""
    return torch.float32 if dtype == torch.bfloat16 and _extension.triton_interpret() else dtype


def register() -> None:
    """Register the triton ops (once). Raises if triton is not importable."""
    global _REGISTERED
    if _REGISTERED:
        return
    importable, _, why = _extension._triton()
    if not importable:
        raise RuntimeError(f"skelemix triton ops: {why}")
    _register_mask_pool()
    _register_skelemix_gather()
    _register_graph_conv()
    _register_bn_epilogue()
    _REGISTERED = True


# ------------------------------------------------------------------------------------------------ mask_pool


def _register_mask_pool() -> None:
    import triton
    from torch.library import triton_op, wrap_triton

    from .mask_pool import _backward_checks, _forward_checks, _torch_check

    km = _kernels("mask_pool")
    fwd_kernel, bwd_kernel = km.mask_pool_fwd_kernel, km.mask_pool_bwd_kernel

    def counts_of(mask: torch.Tensor) -> torch.Tensor:
        return mask.reshape(mask.shape[0], -1).sum(1, dtype=torch.int32)

    @triton_op("skelemix::mask_pool_triton", mutates_args=())
    def mask_pool_triton(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _torch_check("skelemix::mask_pool_triton", _forward_checks(x, mask))
        _check_dtype("skelemix::mask_pool_triton", "x", x)
        B, C, T, V = x.shape
        G, S = mask.shape[0], T * V
        out = torch.empty((B, 2, C), dtype=_result_dtype(x.dtype), device=x.device)
        if B * C == 0:
            return out.to(x.dtype)
        xc, mc = x.contiguous(), mask.reshape(G, S).contiguous()
        counts = counts_of(mc)
        block_c, block_s, num_warps = km.settings(C, S)
        if not _no_data(xc, mc, out):
            with _device(x):
                wrap_triton(fwd_kernel)[(B, triton.cdiv(C, block_c))](
                    xc, mc, counts, out, C, S, B // G, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps)
        return out.to(x.dtype)

    @triton_op("skelemix::_mask_pool_backward_triton", mutates_args=())
    def mask_pool_backward_triton(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _torch_check("skelemix::_mask_pool_backward_triton", _backward_checks(grad, mask))
        _check_dtype("skelemix::_mask_pool_backward_triton", "grad", grad)
        B, _, C = grad.shape
        G, T, V = mask.shape
        S = T * V
        out = torch.empty((B, C, T, V), dtype=_result_dtype(grad.dtype), device=grad.device)
        if out.numel() == 0:
            return out.to(grad.dtype)
        mc = mask.reshape(G, S).contiguous()
        counts = counts_of(mc)
        block_c, block_s, num_warps = km.settings(C, S)
        if not _no_data(grad, mc, out):
            with _device(grad):
                wrap_triton(bwd_kernel)[(B, triton.cdiv(C, block_c), triton.cdiv(S, block_s))](
                    grad, mc, counts, out, C, S, B // G, grad.stride(0), grad.stride(1), grad.stride(2),
                    BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps)
        return out.to(grad.dtype)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1] if ctx.needs_input_grad[0] else None)

    def backward(ctx, grad):
        mask, = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return torch.ops.skelemix._mask_pool_backward_triton(grad, mask), None

    def backward_backward(ctx, grad_grad_x):
        # The backward is linear in grad, with the forward as its adjoint.
        mask, = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return torch.ops.skelemix.mask_pool_triton(grad_grad_x, mask), None

    mask_pool_triton.register_autograd(backward, setup_context=setup_context)
    mask_pool_backward_triton.register_autograd(backward_backward, setup_context=setup_context)


def mask_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``impl="triton"`` of :func:`skelemix.ops.mask_pool`."""
    register()
    return torch.ops.skelemix.mask_pool_triton(x, mask)


# ------------------------------------------------------------------------------------------ skelemix_gather


def _register_skelemix_gather() -> None:
    import triton
    from torch.library import triton_op, wrap_triton

    kg = _kernels("skelemix_gather")
    kernel = kg.skelemix_gather_kernel
    op = "skelemix::skelemix_gather_triton"

    # Shape, dtype and device checks only: checking partner and span values would synchronise with the device
    # (and cannot be traced); skelemix.ops.skelemix_gather checks them before dispatching.
    @triton_op(op, mutates_args=(), schema=(
        "(Tensor x, Tensor partner, Tensor joints, Tensor span, int block) -> (Tensor, Tensor)"))
    def skelemix_gather_triton(x: torch.Tensor, partner: torch.Tensor, joints: torch.Tensor, span: torch.Tensor,
                               block: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch._check(x.dim() == 5, lambda: f"{op}: x must be 5-D (N, C, T, V, M); got shape {list(x.shape)}")
        torch._check(x.is_floating_point(), lambda: f"{op}: x must be floating point; got {x.dtype}")
        N, C, T, V, M = x.shape
        torch._check(partner.dim() == 2 and partner.shape[1] == N and partner.dtype == torch.int64, lambda: (
            f"{op}: partner must be an int64 tensor of shape (R, {N}); got {partner.dtype} {list(partner.shape)}"))
        R = partner.shape[0]
        torch._check(joints.dim() == 3 and joints.shape[0] == R and joints.shape[2] == V
                     and joints.dtype == torch.bool and joints.shape[1] in (1, N), lambda: (
                         f"{op}: joints must be a bool tensor of shape ({R}, G, {V}) with G in (1, {N}); got "
                         f"{joints.dtype} {list(joints.shape)}"))
        G = joints.shape[1]
        torch._check(span.shape == (R, G, 2) and span.dtype == torch.int64, lambda: (
            f"{op}: span must be an int64 tensor of shape ({R}, {G}, 2); got {span.dtype} {list(span.shape)}"))
        torch._check(block >= 1, lambda: f"{op}: block must be >= 1; got {block}")
        for name, t in (("partner", partner), ("joints", joints), ("span", span)):
            torch._check(t.device == x.device, lambda: (
                f"{op}: x and {name} must be on the same device; got x on {x.device} and {name} on {t.device}"))
        Tb = triton.cdiv(T, block)
        blocks = torch.arange(Tb, device=x.device)
        in_span = (blocks >= span[..., :1]) & (blocks < span[..., 1:])  # (R, G, Tb)
        mask = (in_span[..., None] & joints[:, :, None, :]).expand(R, N, Tb, V).contiguous()
        out = torch.empty((R * N, C, T, V, M), dtype=x.dtype, device=x.device)
        if out.numel() == 0:
            return out, mask
        xc, pc, jc, sc = x.contiguous(), partner.contiguous(), joints.contiguous(), span.contiguous()
        rows, cols = C * T, V * M
        block_row, block_col, num_warps = kg.settings(rows, cols)
        if _no_data(xc, pc, jc, sc, out):
            return out, mask
        region_r, region_n = (G, 1) if G > 1 else (1, 0)
        with _device(x):
            wrap_triton(kernel)[(R * N, triton.cdiv(rows, block_row), triton.cdiv(cols, block_col))](
                xc, pc, jc, sc, out, N, T, M, rows, cols, block, region_r, region_n, V,
                BLOCK_ROW=block_row, BLOCK_COL=block_col, num_warps=num_warps)
        return out, mask


def skelemix_gather(x: torch.Tensor, partner: torch.Tensor, joints: torch.Tensor, span: torch.Tensor,
                    block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``impl="triton"`` of ``skelemix.ops.skelemix_gather`` with the (R, N) partner / joints / span schema:
    returns ``(mixed (R*N, C, T, V, M), mask (R, N, ceil(T / block), V))``. Forward only (no autograd)."""
    register()
    return torch.ops.skelemix.skelemix_gather_triton(x, partner, joints, span, block)


# ----------------------------------------------------------------------------------------------- graph_conv


def _dot_flags(dtype: torch.dtype) -> dict:
    interpret = _extension.triton_interpret()
    return {
        # Triton's interpreter computes tl.dot on bf16 operands wrongly (it multiplies the raw 16-bit patterns):
        # there the kernels cast bf16 tiles to fp32 first. GPUs use the bf16 tensor cores.
        "DOT_FP32": interpret and dtype == torch.bfloat16,
        # fp32 follows torch's own matmul setting: TF32 only when torch.set_float32_matmul_precision allows it.
        "ALLOW_TF32": dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest",
    }


AUTOTUNE_ENV = "SKELEMIX_TRITON_AUTOTUNE"


def _autotune(*tensors: torch.Tensor) -> bool:
    """Whether graph_conv's forward autotunes: only when asked (``SKELEMIX_TRITON_AUTOTUNE=1``, as the op
    benchmarks do), and never under the interpreter, inside a trace (fake or functional tensors) or inside a
    CUDA graph capture (autotuning runs and times every config). Otherwise one config (``fwd_config``)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return (os.environ.get(AUTOTUNE_ENV) == "1" and not _extension.triton_interpret()
            and not torch.compiler.is_compiling()
            and not any(isinstance(t, (FakeTensor, FunctionalTensor)) for t in tensors)
            and not (tensors[0].is_cuda and torch.cuda.is_current_stream_capturing()))


def _reduction_target(x: torch.Tensor) -> int:
    """Programs the graph_conv gradient reductions aim at: ``REDUCTION_PROGRAMS_PER_SM`` per SM of x's GPU."""
    kc = _kernels("graph_conv")
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    return kc.REDUCTION_PROGRAMS_PER_SM * sms


def _register_graph_conv() -> None:
    import triton
    from torch.library import triton_op, wrap_triton

    kc = _kernels("graph_conv")
    fwd_kernel = kc.graph_conv_fwd_kernel
    weight_kernel = kc.graph_conv_bwd_weight_kernel
    adjacency_kernel = kc.graph_conv_bwd_adjacency_kernel
    op = "skelemix::graph_conv_triton"

    def check(name, x, weight, bias, A, grad=None):
        torch._check(x.dim() == 4, lambda: f"{name}: x must be 4-D (N, C_in, T, V); got shape {list(x.shape)}")
        torch._check(A.dim() == 3 and A.shape[1] == A.shape[2] == x.shape[3], lambda: (
            f"{name}: A must have shape (K, {x.shape[3]}, {x.shape[3]}) to match x of shape {list(x.shape)}; got "
            f"shape {list(A.shape)}"))
        K = A.shape[0]
        torch._check(K > 0, lambda: f"{name}: A must have at least one subset (K >= 1); got shape {list(A.shape)}")
        if weight is not None:
            torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[1] and weight.shape[0] % K == 0, lambda: (
                f"{name}: weight must have shape (K * C_out, {x.shape[1]}) with K = {K}; got shape "
                f"{list(weight.shape)}"))
        if bias is not None:
            torch._check(weight is not None and bias.shape == (weight.shape[0],), lambda: (
                f"{name}: bias must have shape ({weight.shape[0]},); got shape {list(bias.shape)}"))
        if grad is not None:
            torch._check(grad.dim() == 4 and grad.shape[0] == x.shape[0] and grad.shape[2:] == x.shape[2:],
                         lambda: f"{name}: grad must have shape (N, C_out, T, V) matching x {list(x.shape)}; got "
                                 f"{list(grad.shape)}")
        for arg, t in (("x", x), ("weight", weight), ("bias", bias), ("A", A), ("grad", grad)):
            if t is None:
                continue
            _check_dtype(name, arg, t)
            torch._check(t.dtype == x.dtype and t.device == x.device, lambda: (
                f"{name}: {arg} must match x's dtype and device ({x.dtype}, {x.device}); got {t.dtype}, {t.device}"))

    @triton_op(op, mutates_args=())
    def graph_conv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          A: torch.Tensor) -> torch.Tensor:
        check(op, x, weight, bias, A)
        N, Cin, T, V = x.shape
        K = A.shape[0]
        Cout = weight.shape[0] // K
        y = torch.empty((N, Cout, T, V), dtype=_result_dtype(x.dtype), device=x.device)
        if y.numel() == 0:
            return y.to(x.dtype)
        VP = kc.padded_joints(V)
        b = bias.contiguous() if bias is not None else y  # y: a dummy pointer, never read without a bias
        if not _no_data(x, weight, b, A, y):
            if _autotune(x, weight, b, A, y):
                kernel, config = kc.graph_conv_fwd_autotuned, {}
            else:
                kernel, config = fwd_kernel, kc.fwd_config(VP, Cin, Cout, _extension.triton_interpret())

            def grid(meta):
                return N * triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(Cout, meta["BLOCK_C"])

            with _device(x):
                wrap_triton(kernel)[grid](
                    x, weight, b, A, y, N, Cin, Cout, T, V, K, *x.stride(),
                    Cout * weight.stride(0), weight.stride(0), weight.stride(1), *A.stride(),
                    HAS_BIAS=bias is not None, VP=VP, **_dot_flags(x.dtype), **config)
        return y.to(x.dtype)

    @triton_op("skelemix::_graph_conv_backward_weight_triton", mutates_args=(),
               schema="(Tensor grad, Tensor x, Tensor A) -> (Tensor, Tensor)")
    def graph_conv_backward_weight_triton(grad: torch.Tensor, x: torch.Tensor,
                                          A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        name = "skelemix::_graph_conv_backward_weight_triton"
        check(name, x, None, None, A, grad)
        N, Cout, T, V = grad.shape
        Cin, K = x.shape[1], A.shape[0]
        VP = kc.padded_joints(V)
        block_c, block_i, block_t, split, num_warps = kc.reduction_settings(
            VP, Cin, Cout, lambda bt, bc: N * triton.cdiv(T, bt),
            lambda bc, bi: K * triton.cdiv(Cout, bc) * triton.cdiv(Cin, bi), _extension.triton_interpret(),
            _reduction_target(x))
        programs = K * triton.cdiv(Cout, block_c) * triton.cdiv(Cin, block_i)
        dw = torch.zeros((split, K * Cout, Cin), dtype=torch.float32, device=x.device)
        db = torch.zeros((split, K * Cout), dtype=torch.float32, device=x.device)
        if programs and not _no_data(grad, x, A, dw, db):
            with _device(x):
                wrap_triton(weight_kernel)[(programs, split)](
                    grad, x, A, dw, db, N, Cin, Cout, T, V, K, *grad.stride(), *x.stride(), *A.stride(), split,
                    VP=VP, BLOCK_C=block_c, BLOCK_I=block_i, BLOCK_T=block_t, num_warps=num_warps,
                    **_dot_flags(x.dtype))
        return dw.sum(0).to(x.dtype), db.sum(0).to(x.dtype)

    @triton_op("skelemix::_graph_conv_backward_adjacency_triton", mutates_args=())
    def graph_conv_backward_adjacency_triton(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                             bias: torch.Tensor | None, A: torch.Tensor) -> torch.Tensor:
        name = "skelemix::_graph_conv_backward_adjacency_triton"
        check(name, x, weight, bias, A, grad)
        N, Cout, T, V = grad.shape
        Cin, K = x.shape[1], A.shape[0]
        VP = kc.padded_joints(V)
        block_c, block_i, block_t, split, num_warps = kc.reduction_settings(
            VP, Cin, Cout, lambda bt, bc: N * triton.cdiv(T, bt) * triton.cdiv(Cout, bc), lambda bc, bi: K,
            _extension.triton_interpret(), _reduction_target(x))
        da = torch.zeros((split, K, V, V), dtype=torch.float32, device=x.device)
        b = bias.contiguous() if bias is not None else da
        if Cout and not _no_data(grad, x, weight, b, A, da):
            with _device(x):
                wrap_triton(adjacency_kernel)[(K, split)](
                    grad, x, weight, b, da, N, Cin, Cout, T, V, *grad.stride(), *x.stride(), *weight.stride(),
                    split, HAS_BIAS=bias is not None, VP=VP, BLOCK_C=block_c, BLOCK_I=block_i, BLOCK_T=block_t,
                    num_warps=num_warps, **_dot_flags(x.dtype))
        return da.sum(0).to(x.dtype)

    def setup_context(ctx, inputs, output):
        x, weight, bias, A = inputs
        ctx.save_for_backward(x, weight, bias, A)

    def backward(ctx, grad):
        x, weight, bias, A = ctx.saved_tensors
        need_x, need_w, need_b, need_a = ctx.needs_input_grad
        gx = gw = gb = ga = None
        if need_x:
            # dL/dx = sum_k W_k^T (g A_k^T): the forward op with transposed weight blocks and adjacency, so
            # double backward through it is the forward's own autograd.
            K = A.shape[0]
            Cout, Cin = weight.shape[0] // K, weight.shape[1]
            wt = weight.reshape(K, Cout, Cin).transpose(1, 2).reshape(K * Cin, Cout)
            gx = torch.ops.skelemix.graph_conv_triton(grad, wt, None, A.transpose(1, 2))
        if need_w or need_b:
            gw, gb = torch.ops.skelemix._graph_conv_backward_weight_triton(grad, x, A)
            gw, gb = (gw if need_w else None), (gb if need_b else None)
        if need_a:
            ga = torch.ops.skelemix._graph_conv_backward_adjacency_triton(grad, x, weight, bias, A)
        return gx, gw, gb, ga

    def no_double_backward(ctx, *grads):
        raise NotImplementedError(
            "skelemix::graph_conv_triton: double backward through the weight, bias or A gradients is not "
            "implemented; use impl='eager' for it")

    def save_nothing(ctx, inputs, output):
        pass

    graph_conv_triton.register_autograd(backward, setup_context=setup_context)
    graph_conv_backward_weight_triton.register_autograd(no_double_backward, setup_context=save_nothing)
    graph_conv_backward_adjacency_triton.register_autograd(no_double_backward, setup_context=save_nothing)


def graph_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor) -> torch.Tensor:
    """``impl="triton"`` of :func:`skelemix.ops.graph_conv`."""
    register()
    return torch.ops.skelemix.graph_conv_triton(x, weight, bias, A)


# ---------------------------------------------------------------------------------------------- bn_epilogue


def _bn_epilogue_checks(op: str, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, eps: float, p: float,
                        channel_vectors: dict, like_x: dict) -> None:
    """The checks of csrc/bn_epilogue.cpp (same messages), with float64 refused as by every Triton op."""
    torch._check(x.dim() >= 2, lambda: f"{op}: x must be at least 2-D (N, C, *); got shape {list(x.shape)}")
    _check_dtype(op, "x", x)
    C = x.shape[1]
    for name, t in {"weight": weight, **channel_vectors}.items():
        torch._check(t.dim() == 1 and t.shape[0] == C, lambda: (
            f"{op}: {name} must have shape ({C},) (the channels of x, shape {list(x.shape)}); got shape "
            f"{list(t.shape)}"))
        torch._check(t.dtype == torch.float32, lambda: (
            f"{op}: {name} must be torch.float32 (the accumulation dtype of {x.dtype} x); got {t.dtype}"))
    for name, t in like_x.items():
        torch._check(t.shape == x.shape, lambda: (
            f"{op}: {name} must have the shape of x {list(x.shape)}; got shape {list(t.shape)}"))
        torch._check(t.dtype == x.dtype, lambda: f"{op}: {name} must have the dtype of x ({x.dtype}); got {t.dtype}")
    torch._check(seed.numel() == 1 and seed.dtype == torch.int64, lambda: (
        f"{op}: seed must be an int64 tensor of one element; got {seed.dtype} of shape {list(seed.shape)}"))
    for name, t in {"weight": weight, **channel_vectors, **like_x, "seed": seed}.items():
        torch._check(t.device == x.device, lambda: (
            f"{op}: x and {name} must be on the same device; got x on {x.device} and {name} on {t.device}"))
    torch._check(eps >= 0, lambda: f"{op}: eps must be >= 0; got {eps}")
    torch._check(0 <= p < 1, lambda: f"{op}: p (dropout probability) must be in [0, 1); got {p}")


def _register_bn_epilogue() -> None:
    import triton
    from torch.library import triton_op, wrap_triton

    from .. import reference

    kb = _kernels("bn_epilogue")
    fwd_kernel, reduce_kernel, bwd_kernel = (kb.bn_epilogue_fwd_kernel, kb.bn_epilogue_bwd_reduce_kernel,
                                             kb.bn_epilogue_bwd_kernel)
    op, backward_op = "skelemix::bn_epilogue_triton", "skelemix::_bn_epilogue_backward_triton"

    def dropout_args(p: float) -> tuple[int, float]:
        # (threshold, 1 / (1 - p)): plain numbers, so the seed is the only dropout state read on the device.
        return reference.dropout_threshold(p), 1.0 / (1.0 - p)

    @triton_op(op, mutates_args=(), schema=(
        "(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor? stats_mean, Tensor? stats_var, "
        "Tensor seed, float eps, float p, bool relu) -> (Tensor, Tensor, Tensor)"))
    def bn_epilogue_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None,
                           stats_mean: torch.Tensor | None, stats_var: torch.Tensor | None, seed: torch.Tensor,
                           eps: float, p: float, relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch._check((stats_mean is None) == (stats_var is None), lambda: (
            f"{op}: stats_mean and stats_var must both be given (fixed statistics) or both be None (batch "
            "statistics)"))
        stats = {} if stats_mean is None else {"stats_mean": stats_mean, "stats_var": stats_var}
        _bn_epilogue_checks(op, x, weight, seed, eps, p, {"bias": bias, **stats},
                            {} if residual is None else {"residual": residual})
        N, C = x.shape[:2]
        L = math.prod(x.shape[2:])
        if stats_mean is None:
            var, mean = torch.var_mean(x.to(torch.float32), dim=[0, *range(2, x.dim())], correction=0)
            used_mean, used_var = mean, var
        else:
            used_mean, used_var = stats_mean, stats_var
            mean, var = (x.new_empty((0,), dtype=torch.float32) for _ in range(2))  # two: outputs may not alias
        a = weight * torch.rsqrt(used_var + eps)  # as the reference computes it
        y = torch.empty(x.shape, dtype=_result_dtype(x.dtype), device=x.device)
        if y.numel() == 0:
            return y.to(x.dtype), mean, var
        xc, mc, bc = x.contiguous(), used_mean.contiguous(), bias.contiguous()
        rc = residual.contiguous() if residual is not None else xc  # xc: a dummy pointer, never read
        threshold, keep_scale = dropout_args(p)
        block_r, block_l, num_warps = kb.settings(N * C, L)
        if not _no_data(xc, rc, y, mc, a, bc, seed):
            with _device(x):
                wrap_triton(fwd_kernel)[(triton.cdiv(N * C, block_r), triton.cdiv(L, block_l))](
                    xc, rc, y, mc, a, bc, seed, N * C, C, L, threshold, keep_scale, HAS_RES=residual is not None,
                    DROPOUT=p > 0, RELU=relu, BLOCK_R=block_r, BLOCK_L=block_l, num_warps=num_warps)
        return y.to(x.dtype), mean, var

    @triton_op(backward_op, mutates_args=(), schema=(
        "(Tensor grad, Tensor x, Tensor y, Tensor weight, Tensor mean, Tensor var, Tensor seed, float eps, "
        "float p, bool relu, bool batch_stats, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)"))
    def bn_epilogue_backward_triton(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                                    mean: torch.Tensor, var: torch.Tensor, seed: torch.Tensor, eps: float,
                                    p: float, relu: bool, batch_stats: bool, output_mask: list[bool]
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _bn_epilogue_checks(backward_op, x, weight, seed, eps, p, {"mean": mean, "var": var}, {"grad": grad, "y": y})
        torch._check(len(output_mask) == 4, lambda: f"{backward_op}: output_mask must have 4 entries")
        want_x, want_w, want_b, want_res = output_mask
        N, C = x.shape[:2]
        L = math.prod(x.shape[2:])
        R, n = N * C, max(N * L, 1)

        def empty():  # a fresh one per output: outputs may not alias
            return x.new_empty((0,), dtype=torch.float32)

        gx = torch.empty(x.shape, dtype=_result_dtype(x.dtype), device=x.device) if want_x else None
        gres = torch.empty(x.shape, dtype=_result_dtype(x.dtype), device=x.device) if want_res else None
        # Per-row fp32 sums of gp and gp * xhat, summed over the batch below.
        need_sums = want_w or want_b or (want_x and batch_stats)
        sums = torch.empty((2, N, C), dtype=torch.float32, device=x.device) if need_sums else None
        invstd = torch.rsqrt(var + eps)
        a = weight * invstd
        gc, xc, yc, mc = grad.contiguous(), x.contiguous(), y.contiguous(), mean.contiguous()
        threshold, keep_scale = dropout_args(p)
        block_r, block_l, num_warps = kb.settings(R, L)
        flags = dict(DROPOUT=p > 0, RELU=relu, BLOCK_R=block_r, BLOCK_L=block_l, num_warps=num_warps)
        launch = R * L > 0 and not _no_data(gc, xc, yc, mc, invstd, a, seed, gx, gres, sums)
        if need_sums and launch:
            with _device(x):
                wrap_triton(reduce_kernel)[(triton.cdiv(R, block_r),)](
                    gc, xc, yc, gres if want_res else gc, sums[0], sums[1], mc, invstd, seed, R, C, L, threshold,
                    keep_scale, WRITE_RES=want_res, **flags)
        if need_sums:
            if R * L == 0:  # no launch: every sum is 0
                sums.zero_()
            gb, gw = sums[0].sum(0), sums[1].sum(0)  # two reductions: outputs may not alias
        else:
            gb = gw = None
        if (want_x or (want_res and not need_sums)) and launch:
            cb, cw = (gb / n, gw / n) if want_x and batch_stats else (a, a)  # (a, a): dummies, never read
            with _device(x):
                wrap_triton(bwd_kernel)[(triton.cdiv(R, block_r), triton.cdiv(L, block_l))](
                    gc, xc, yc, gx if want_x else gc, gres if want_res else gc, mc, invstd, a, cb, cw, seed, R, C,
                    L, threshold, keep_scale, BATCH_STATS=batch_stats, WRITE_X=want_x,
                    WRITE_RES=want_res and not need_sums, **flags)
        return (gx.to(x.dtype) if want_x else empty(), gw if want_w else empty(), gb if want_b else empty(),
                gres.to(x.dtype) if want_res else empty())

    def setup_context(ctx, inputs, output):
        x, weight, _, residual, stats_mean, stats_var, seed, eps, p, relu = inputs
        y, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        ctx.batch_stats = stats_mean is None
        if not ctx.batch_stats:
            mean, var = stats_mean, stats_var
        ctx.has_residual = residual is not None
        ctx.eps, ctx.p, ctx.relu = eps, p, relu
        ctx.save_for_backward(x, y, weight, mean, var, seed)

    def backward(ctx, grad, grad_mean, grad_var):
        x, y, weight, mean, var, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], need[3] and ctx.has_residual]
        grads = [None] * 10
        if any(mask):
            outs = torch.ops.skelemix._bn_epilogue_backward_triton(
                grad, x, y, weight, mean.detach(), var.detach(), seed, ctx.eps, ctx.p, ctx.relu, ctx.batch_stats,
                mask)
            grads[:4] = [g if m else None for g, m in zip(outs, mask)]
        return tuple(grads)

    def no_double_backward(ctx, *grads):
        raise NotImplementedError(
            f"{op}: double backward (through its gradients) is not implemented; use impl='eager' for it")

    def save_nothing(ctx, inputs, output):
        pass

    bn_epilogue_triton.register_autograd(backward, setup_context=setup_context)
    bn_epilogue_backward_triton.register_autograd(no_double_backward, setup_context=save_nothing)


def bn_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None,
                stats_mean: torch.Tensor | None, stats_var: torch.Tensor | None, seed: torch.Tensor, eps: float,
                p: float, relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``impl="triton"`` of ``skelemix.ops.bn_epilogue``: returns ``(y, mean, var)``, see
    :func:`skelemix.reference.bn_epilogue`."""
    register()
    return torch.ops.skelemix.bn_epilogue_triton(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p, relu)
