"""Spatio-temporal mask pooling: ``skelemix.ops.mask_pool(x, mask, impl="auto")``.

The C++ op ``torch.ops.skelemix.mask_pool`` (schema in csrc/mask_pool.cpp, kernels in csrc/cpu and csrc/cuda)
gets its PT2 surface here: fake kernels for it and for ``_mask_pool_backward``, and autograd for both (the
backward is linear in ``grad``, and its adjoint is the forward, so double backward is exact too).
"""
from __future__ import annotations

from typing import Callable, Iterator, Tuple

import torch

from .. import _extension, reference
from . import _triton
from ._impl import select

# (condition, exception type, message) triples, evaluated lazily and in order. The wrapper raises the
# exception; the fake kernels feed torch._check. Messages match csrc/mask_pool.cpp.
_Check = Tuple[object, type, Callable[[], str]]
_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _mask_checks(mask: torch.Tensor, t: torch.Tensor, t_name: str) -> Iterator[_Check]:
    yield mask.dim() == 3, ValueError, lambda: f"mask must be 3-D (G, T, V); got shape {list(mask.shape)}"
    yield mask.dtype == torch.bool, TypeError, lambda: f"mask must be a bool tensor; got {mask.dtype}"
    yield t.device == mask.device, ValueError, lambda: (
        f"{t_name} and mask must be on the same device; got {t_name} on {t.device} and mask on {mask.device}")


def _group_check(B, G) -> _Check:
    return G > 0 and B % G == 0, ValueError, lambda: (
        f"the batch size B={B} must be a multiple of the number of masks G={G}")


def _forward_checks(x: torch.Tensor, mask: torch.Tensor) -> Iterator[_Check]:
    yield x.dim() == 4, ValueError, lambda: f"x must be 4-D (B, C, T, V); got shape {list(x.shape)}"
    yield x.dtype in _FLOATING, TypeError, lambda: (
        f"x must be floating point (float32, float64, float16 or bfloat16); got {x.dtype}")
    yield from _mask_checks(mask, x, "x")
    yield mask.shape[1] == x.shape[2] and mask.shape[2] == x.shape[3], ValueError, lambda: (
        f"mask must have shape (G, {x.shape[2]}, {x.shape[3]}) to match x of shape {list(x.shape)}; "
        f"got shape {list(mask.shape)}")
    yield _group_check(x.shape[0], mask.shape[0])


def _backward_checks(grad: torch.Tensor, mask: torch.Tensor) -> Iterator[_Check]:
    yield grad.dim() == 3, ValueError, lambda: f"grad must be 3-D (B, 2, C); got shape {list(grad.shape)}"
    yield grad.shape[1] == 2, ValueError, lambda: f"grad must have shape (B, 2, C); got shape {list(grad.shape)}"
    yield grad.dtype in _FLOATING, TypeError, lambda: (
        f"grad must be floating point (float32, float64, float16 or bfloat16); got {grad.dtype}")
    yield from _mask_checks(mask, grad, "grad")
    yield _group_check(grad.shape[0], mask.shape[0])


def _torch_check(op: str, checks: Iterator[_Check]) -> None:
    for ok, _, message in checks:
        torch._check(ok, lambda message=message: f"{op}: {message()}")


def _cpp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.ops.skelemix.mask_pool(x, mask)


# "cpp" and "cuda" are always listed: select() then checks _extension.available() and, when the extension is
# missing, raises an error that says how to build it (rather than "no such impl").
_IMPLEMENTATIONS = {"eager": reference.mask_pool, "cpp": _cpp, "cuda": _cpp, "triton": _triton.mask_pool}


def mask_pool(x: torch.Tensor, mask: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Mean of ``x`` over the True cells and over the False cells of a ``(T, V)`` mask.

    Args:
        x: ``(B, C, T, V)`` float32, float64, float16 or bfloat16.
        mask: ``(G, T, V)`` bool on the device of ``x``, ``B % G == 0``; row ``b`` uses ``mask[b // (B // G)]``.
            Not differentiable.
        impl: ``auto`` (C++ on CPU when built, else eager), ``eager``, ``cpp`` or ``cuda``.

    Returns:
        ``(B, 2, C)`` in the dtype of ``x``; see :func:`skelemix.reference.mask_pool`.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError(f"skelemix.ops.mask_pool: x and mask must be tensors; got {type(x).__name__} and "
                        f"{type(mask).__name__}")
    for ok, exc, message in _forward_checks(x, mask):
        if not ok:
            raise exc(f"skelemix.ops.mask_pool: {message()}")
    return select("mask_pool", impl, x.device, _IMPLEMENTATIONS, x.dtype)(x, mask)


def _register() -> None:
    @torch.library.register_fake("skelemix::mask_pool")
    def _(x, mask):
        _torch_check("skelemix::mask_pool", _forward_checks(x, mask))
        return x.new_empty((x.shape[0], 2, x.shape[1]))

    @torch.library.register_fake("skelemix::_mask_pool_backward")
    def _(grad, mask):
        _torch_check("skelemix::_mask_pool_backward", _backward_checks(grad, mask))
        return grad.new_empty((grad.shape[0], grad.shape[2], mask.shape[1], mask.shape[2]))

    def setup_context(ctx, inputs, output):
        _, mask = inputs
        # The backward needs only the mask (sizes come from grad and mask).
        ctx.save_for_backward(mask if ctx.needs_input_grad[0] else None)

    def backward(ctx, grad):
        mask, = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return torch.ops.skelemix._mask_pool_backward(grad, mask), None

    def backward_backward(ctx, grad_grad_x):
        # _mask_pool_backward is linear in grad with adjoint mask_pool.
        mask, = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return torch.ops.skelemix.mask_pool(grad_grad_x, mask), None

    torch.library.register_autograd("skelemix::mask_pool", backward, setup_context=setup_context)
    torch.library.register_autograd("skelemix::_mask_pool_backward", backward_backward, setup_context=setup_context)


if _extension.HAS_CPP:
    _register()
