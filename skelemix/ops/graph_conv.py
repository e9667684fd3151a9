"""Spatial graph convolution of one ST-GCN block: ``skelemix.ops.graph_conv(x, weight, bias, A, impl="auto")``.

The C++ op ``torch.ops.skelemix.graph_conv`` (schema in csrc/graph_conv.cpp, kernels in csrc/cpu and csrc/cuda)
gets its PT2 surface here: fake kernels for it and for ``_graph_conv_backward``, and autograd for the forward.
The backward op returns all four gradients at once (each computed only when asked for); double backward is
not supported and raises.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch

from .. import _extension, reference
from . import _triton
from ._impl import register_no_double_backward, select

# (condition, exception type, message) triples, evaluated lazily and in order. The wrapper raises the
# exception; the fake kernels feed torch._check. Messages match csrc/graph_conv.cpp.
_Check = Tuple[object, type, Callable[[], str]]
_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _dtype_check(t: torch.Tensor, name: str, x: torch.Tensor) -> _Check:
    return t.dtype == x.dtype, TypeError, lambda: f"{name} must have the dtype of x ({x.dtype}); got {t.dtype}"


def _device_check(t: torch.Tensor, name: str, x: torch.Tensor) -> _Check:
    return t.device == x.device, ValueError, lambda: (
        f"x and {name} must be on the same device; got x on {x.device} and {name} on {t.device}")


def _forward_checks(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    A: torch.Tensor) -> Iterator[_Check]:
    yield x.dim() == 4, ValueError, lambda: f"x must be 4-D (N, C_in, T, V); got shape {list(x.shape)}"
    yield x.dtype in _FLOATING, TypeError, lambda: (
        f"x must be floating point (float32, float64, float16 or bfloat16); got {x.dtype}")
    yield weight.dim() == 2, ValueError, lambda: (
        f"weight must be 2-D (K * C_out, C_in); got shape {list(weight.shape)}")
    yield A.dim() == 3, ValueError, lambda: f"A must be 3-D (K, V, V); got shape {list(A.shape)}"
    yield _dtype_check(weight, "weight", x)
    yield _dtype_check(A, "A", x)
    yield _device_check(weight, "weight", x)
    yield _device_check(A, "A", x)
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
        yield _dtype_check(bias, "bias", x)
        yield _device_check(bias, "bias", x)


def _backward_checks(grad, x, weight, bias, A) -> Iterator[_Check]:
    yield from _forward_checks(x, weight, bias, A)
    yield _dtype_check(grad, "grad", x)
    yield _device_check(grad, "grad", x)
    N, _, T, V = x.shape
    c_out = weight.shape[0] // A.shape[0]
    expected = [N, c_out, T, V]
    yield list(grad.shape) == expected, ValueError, lambda: (
        f"grad must have shape (N, C_out, T, V) = {expected}; got shape {list(grad.shape)}")


def _torch_check(op: str, checks: Iterator[_Check]) -> None:
    for ok, _, message in checks:
        torch._check(ok, lambda message=message: f"{op}: {message()}")


def _cpp(x, weight, bias, A):
    return torch.ops.skelemix.graph_conv(x, weight, bias, A)


# "cpp" and "cuda" are always listed: select() then checks _extension.available() and, when the extension is
# missing, raises an error that says how to build it (rather than "no such impl").
_IMPLEMENTATIONS = {"eager": reference.graph_conv, "cpp": _cpp, "cuda": _cpp, "triton": _triton.graph_conv}


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
    for ok, exc, message in _forward_checks(x, weight, bias, A):
        if not ok:
            raise exc(f"skelemix.ops.graph_conv: {message()}")
    return select("graph_conv", impl, x.device, _IMPLEMENTATIONS, x.dtype)(x, weight, bias, A)


def _register() -> None:
    @torch.library.register_fake("skelemix::graph_conv")
    def _(x, weight, bias, A):
        _torch_check("skelemix::graph_conv", _forward_checks(x, weight, bias, A))
        N, _, T, V = x.shape
        return x.new_empty((N, weight.shape[0] // A.shape[0], T, V))

    @torch.library.register_fake("skelemix::_graph_conv_backward")
    def _(grad, x, weight, bias, A, output_mask):
        _torch_check("skelemix::_graph_conv_backward", _backward_checks(grad, x, weight, bias, A))
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


if _extension.HAS_CPP:
    _register()
