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
``skelemix::_graph_conv_backward_adjacency_triton`` (no double backward: they raise); and
``skelemix::skelemix_gather_triton`` (forward only, the (R, N) partner/joints/span schema).
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
            def grid(meta):
                return N * triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(Cout, meta["BLOCK_C"])

            with _device(x):
                wrap_triton(fwd_kernel)[grid](
                    x, weight, b, A, y, N, Cin, Cout, T, V, K, *x.stride(),
                    Cout * weight.stride(0), weight.stride(0), weight.stride(1), *A.stride(),
                    HAS_BIAS=bias is not None, VP=VP, INTERPRET=_extension.triton_interpret(),
                    **_dot_flags(x.dtype))
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
            lambda bc, bi: K * triton.cdiv(Cout, bc) * triton.cdiv(Cin, bi), _extension.triton_interpret())
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
            _extension.triton_interpret())
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
