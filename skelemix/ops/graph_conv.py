"""Spatial graph convolution of one ST-GCN block: ``skelemix.ops.graph_conv(x, weight, bias, A, impl="auto")``.

The C++ op ``torch.ops.skelemix.graph_conv`` (schema in csrc/graph_conv.cpp, kernels in csrc/cpu and csrc/cuda)
gets its PT2 surface here: fake kernels for it and for ``_graph_conv_backward``, and autograd for the forward.
The backward op returns all four gradients at once (each computed only when asked for); double backward is
not supported and raises.

The Triton op ``skelemix::graph_conv_triton`` (kernels in :mod:`skelemix.kernels.graph_conv`) takes the same checks.
Its input gradient is ``graph_conv_triton`` itself with transposed weight blocks and adjacency (so double
backward w.r.t. x works); ``_graph_conv_backward_weight_triton`` (weight and bias) and
``_graph_conv_backward_adjacency_triton`` have no gradient of their own.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from .. import _extension, reference
from ._checks import Check, floating, raise_first, same_device, same_dtype, torch_check
from ._impl import register_no_double_backward, register_triton_once, select


def _forward_checks(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                    triton: bool = False) -> Iterator[Check]:
    """Messages match csrc/graph_conv.cpp; ``triton`` adds the Triton ops' refusal of float64."""
    yield x.dim() == 4, ValueError, lambda: f"x must be 4-D (N, C_in, T, V); got shape {list(x.shape)}"
    yield from floating(x, "x", triton)
    yield weight.dim() == 2, ValueError, lambda: (
        f"weight must be 2-D (K * C_out, C_in); got shape {list(weight.shape)}")
    yield A.dim() == 3, ValueError, lambda: f"A must be 3-D (K, V, V); got shape {list(A.shape)}"
    yield same_dtype(weight, "weight", x)
    yield same_dtype(A, "A", x)
    yield same_device(weight, "weight", x)
    yield same_device(A, "A", x)
    V, K = x.shape[3], A.shape[0]
    yield A.shape[1] == V and A.shape[2] == V, ValueError, lambda: (
        f"A must have shape (K, {V}, {V}) to match x of shape {list(x.shape)}; got shape {list(A.shape)}")
    yield weight.shape[1] == x.shape[1], ValueError, lambda: (
        f"weight must have shape (K * C_out, {x.shape[1]}) to match x of shape {list(x.shape)}; "
        f"got shape {list(weight.shape)}")
    yield K > 0 and weight.shape[0] % K == 0, ValueError, lambda: (
        f"weight must have a multiple of K = {K} rows (K * C_out) to match A of shape {list(A.shape)}; "
        f"got shape {list(weight.shape)}")
    if bias is not None:
        yield bias.dim() == 1 and bias.shape[0] == weight.shape[0], ValueError, lambda: (
            f"bias must have shape ({weight.shape[0]},) (K * C_out) to match weight of shape "
            f"{list(weight.shape)}; got shape {list(bias.shape)}")
        yield same_dtype(bias, "bias", x)
        yield same_device(bias, "bias", x)


def _backward_checks(grad, x, weight, bias, A, triton: bool = False) -> Iterator[Check]:
    yield from _forward_checks(x, weight, bias, A, triton)
    yield same_dtype(grad, "grad", x)
    yield same_device(grad, "grad", x)
    N, _, T, V = x.shape
    c_out = weight.shape[0] // A.shape[0]
    expected = [N, c_out, T, V]
    yield list(grad.shape) == expected, ValueError, lambda: (
        f"grad must have shape (N, C_out, T, V) = {expected}; got shape {list(grad.shape)}")


def _cpp(x, weight, bias, A):
    return torch.ops.skelemix.graph_conv(x, weight, bias, A)


def _triton(x, weight, bias, A):
    register_triton_once("graph_conv", _register_triton)
    return torch.ops.skelemix.graph_conv_triton(x, weight, bias, A)


# "cpp" and "cuda" are always listed: select() then checks _extension.available() and, when the extension is
# missing, raises an error that says how to build it (rather than "no such impl").
_IMPLEMENTATIONS = {"eager": reference.graph_conv, "cpp": _cpp, "cuda": _cpp, "triton": _triton}


def graph_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
               impl: str = "auto") -> torch.Tensor:
    """The ST-GCN spatial graph convolution, without the ``(N, K*C_out, T, V)`` intermediate.

    Args:
        x: ``(N, C_in, T, V)`` float32, float64, float16 or bfloat16.
        weight: ``(K * C_out, C_in)``, the 1x1 convolution (row ``k * C_out + c`` feeds subset ``k``).
        bias: ``(K * C_out,)`` or None.
        A: ``(K, V, V)``, the adjacency subsets times the edge importance.
        impl: ``auto`` (C++ on CPU when built, else eager), ``eager``, ``cpp``, ``cuda`` or ``triton``.

    All tensors share one dtype and device; all four are differentiable.

    Returns:
        ``(N, C_out, T, V)``; see :func:`skelemix.reference.graph_conv`.
    """
    for name, t in (("x", x), ("weight", weight), ("A", A)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"skelemix.ops.graph_conv: {name} must be a tensor; got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"skelemix.ops.graph_conv: bias must be a tensor or None; got {type(bias).__name__}")
    if torch.is_autocast_enabled(x.device.type):  # custom ops get no autocast casts: run in its dtype
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, A = x.to(dtype), weight.to(dtype), A.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    raise_first("graph_conv", _forward_checks(x, weight, bias, A))
    return select("graph_conv", impl, x.device, _IMPLEMENTATIONS, x.dtype)(x, weight, bias, A)


def _register_cpp() -> None:
    @torch.library.register_fake("skelemix::graph_conv")
    def _(x, weight, bias, A):
        torch_check("skelemix::graph_conv", _forward_checks(x, weight, bias, A))
        N, _, T, V = x.shape
        return x.new_empty((N, weight.shape[0] // A.shape[0], T, V))

    @torch.library.register_fake("skelemix::_graph_conv_backward")
    def _(grad, x, weight, bias, A, output_mask):
        torch_check("skelemix::_graph_conv_backward", _backward_checks(grad, x, weight, bias, A))
        # Gradients not asked for come back as empty (0,) tensors.
        shapes = (x.shape, weight.shape, bias.shape if bias is not None else None, A.shape)
        return tuple(x.new_empty(shape if wanted and shape is not None else (0,))
                     for wanted, shape in zip(output_mask, shapes))

    def setup_context(ctx, inputs, output):
        x, weight, bias, A = inputs
        need_x, need_w, need_b, need_A = ctx.needs_input_grad[:4]
        ctx.has_bias = bias is not None
        # What each gradient reads: grad_x needs weight and A; grad_weight x and A; grad_bias A;
        # grad_A x, weight and the bias. Only the tensors some requested gradient reads are kept; the backward
        # op still takes all four, so the others are passed as zero-size stand-ins of the right rank.
        keep_x = need_w or need_A
        keep_w = need_x or need_A
        keep_b = need_A and bias is not None
        ctx.shapes = (x.shape, weight.shape, A.shape)
        ctx.save_for_backward(x if keep_x else None, weight if keep_w else None, bias if keep_b else None, A)

    def backward(ctx, grad):
        x, weight, bias, A = ctx.saved_tensors
        need_x, need_w, need_b, need_A = ctx.needs_input_grad[:4]
        x_shape, w_shape, _ = ctx.shapes
        if x is None:
            # Only its shape matters to grad_x / grad_bias: an expanded zero-size-storage stand-in.
            x = grad.new_zeros(()).expand(x_shape)
        if weight is None:
            weight = grad.new_zeros(()).expand(w_shape)
        if bias is None and ctx.has_bias and need_b:
            bias = grad.new_zeros(()).expand(w_shape[0])
        grads = torch.ops.skelemix._graph_conv_backward(
            grad, x, weight, bias if ctx.has_bias else None, A, [need_x, need_w, need_b, need_A])
        return tuple(g if wanted else None for g, wanted in zip(grads, (need_x, need_w, need_b, need_A)))

    torch.library.register_autograd("skelemix::graph_conv", backward, setup_context=setup_context)
    register_no_double_backward("skelemix::graph_conv", "skelemix::_graph_conv_backward")


def _graph_conv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       A: torch.Tensor) -> torch.Tensor:
    from ..kernels import graph_conv as kernels

    torch_check("skelemix::graph_conv_triton", _forward_checks(x, weight, bias, A, triton=True))
    return kernels.forward(x, weight, bias, A)


def _backward_weight_triton(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import graph_conv as kernels

    torch_check("skelemix::_graph_conv_backward_weight_triton", _backward_checks(grad, x, weight, bias, A, True))
    return kernels.backward_weight(grad, x, A)


def _backward_adjacency_triton(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               A: torch.Tensor) -> torch.Tensor:
    from ..kernels import graph_conv as kernels

    torch_check("skelemix::_graph_conv_backward_adjacency_triton", _backward_checks(grad, x, weight, bias, A, True))
    return kernels.backward_adjacency(grad, x, weight, bias, A)


def _register_triton() -> None:
    from torch.library import triton_op

    triton_op("skelemix::graph_conv_triton", mutates_args=())(_graph_conv_triton)
    triton_op("skelemix::_graph_conv_backward_weight_triton", mutates_args=(), schema=(
        "(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor A) -> (Tensor, Tensor)"))(_backward_weight_triton)
    triton_op("skelemix::_graph_conv_backward_adjacency_triton", mutates_args=())(_backward_adjacency_triton)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

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
            gw, gb = torch.ops.skelemix._graph_conv_backward_weight_triton(grad, x, weight, bias, A)
            gw, gb = (gw if need_w else None), (gb if need_b else None)
        if need_a:
            ga = torch.ops.skelemix._graph_conv_backward_adjacency_triton(grad, x, weight, bias, A)
        return gx, gw, gb, ga

    torch.library.register_autograd("skelemix::graph_conv_triton", backward, setup_context=setup_context)
    for backward_op in ("_graph_conv_backward_weight_triton", "_graph_conv_backward_adjacency_triton"):
        register_no_double_backward("skelemix::graph_conv_triton", f"skelemix::{backward_op}")


if _extension.HAS_CPP:
    _register_cpp()
