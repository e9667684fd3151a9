"""Spatio-temporal mask pooling: ``skelemix.ops.mask_pool(x, mask, impl="auto")``.

The C++ op ``torch.ops.skelemix.mask_pool`` (schema in csrc/mask_pool.cpp, kernels in csrc/cpu and csrc/cuda)
gets its PT2 surface here: fake kernels for it and for ``_mask_pool_backward``, and autograd for both (the
backward is linear in ``grad``, and its adjoint is the forward, so double backward is exact too). The Triton ops
``skelemix::mask_pool_triton`` and ``skelemix::_mask_pool_backward_triton`` (kernels in
:mod:`skelemix.kernels.mask_pool`) take the same checks and the same autograd.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .. import _extension, reference
from ._checks import Check, floating, raise_first, same_device, torch_check
from ._impl import register_triton_once, select


def _mask_checks(mask: torch.Tensor, t: torch.Tensor, t_name: str) -> Iterator[Check]:
    yield mask.dim() == 3, ValueError, lambda: f"mask must be 3-D (G, T, V); got shape {list(mask.shape)}"
    yield mask.dtype == torch.bool, TypeError, lambda: f"mask must be a bool tensor; got {mask.dtype}"
    yield same_device(mask, "mask", t, t_name)


def _group_check(B, G) -> Check:
    return G > 0 and B % G == 0, ValueError, lambda: (
        f"the batch size B={B} must be a multiple of the number of masks G={G}")


def _forward_checks(x: torch.Tensor, mask: torch.Tensor, triton: bool = False) -> Iterator[Check]:
    """Messages match csrc/mask_pool.cpp; ``triton`` adds the Triton ops' refusal of float64."""
    yield x.dim() == 4, ValueError, lambda: f"x must be 4-D (B, C, T, V); got shape {list(x.shape)}"
    yield from floating(x, "x", triton)
    yield from _mask_checks(mask, x, "x")
    yield mask.shape[1] == x.shape[2] and mask.shape[2] == x.shape[3], ValueError, lambda: (
        f"mask must have shape (G, {x.shape[2]}, {x.shape[3]}) to match x of shape {list(x.shape)}; "
        f"got shape {list(mask.shape)}")
    yield _group_check(x.shape[0], mask.shape[0])


def _backward_checks(grad: torch.Tensor, mask: torch.Tensor, triton: bool = False) -> Iterator[Check]:
    yield grad.dim() == 3, ValueError, lambda: f"grad must be 3-D (B, 2, C); got shape {list(grad.shape)}"
    yield grad.shape[1] == 2, ValueError, lambda: f"grad must have shape (B, 2, C); got shape {list(grad.shape)}"
    yield from floating(grad, "grad", triton)
    yield from _mask_checks(mask, grad, "grad")
    yield _group_check(grad.shape[0], mask.shape[0])


def _cpp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.ops.skelemix.mask_pool(x, mask)


def _triton(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    register_triton_once("mask_pool", _register_triton)
    return torch.ops.skelemix.mask_pool_triton(x, mask)


# "cpp" and "cuda" are always listed: select() then checks _extension.available() and, when the extension is
# missing, raises an error that says how to build it (rather than "no such impl").
_IMPLEMENTATIONS = {"eager": reference.mask_pool, "cpp": _cpp, "cuda": _cpp, "triton": _triton}


def mask_pool(x: torch.Tensor, mask: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Mean of ``x`` over the True cells and over the False cells of a ``(T, V)`` mask.

    Args:
        x: ``(B, C, T, V)`` float32, float64, float16 or bfloat16.
        mask: ``(G, T, V)`` bool on the device of ``x``, ``B % G == 0``; row ``b`` uses ``mask[b // (B // G)]``.
            Not differentiable.
        impl: ``auto`` (C++ on CPU when built, else eager), ``eager``, ``cpp``, ``cuda`` or ``triton``.

    Returns:
        ``(B, 2, C)`` in the dtype of ``x``; see :func:`skelemix.reference.mask_pool`.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError(f"skelemix.ops.mask_pool: x and mask must be tensors; got {type(x).__name__} and "
                        f"{type(mask).__name__}")
    raise_first("mask_pool", _forward_checks(x, mask))
    return select("mask_pool", impl, x.device, _IMPLEMENTATIONS, x.dtype)(x, mask)


def _register_autograd(forward: str, backward: str) -> None:
    """Autograd for ``skelemix::<forward>`` and its backward op (the C++ pair or the Triton pair): the backward is
    linear in ``grad`` and its adjoint is the forward, so each op's gradient is the other op."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1] if ctx.needs_input_grad[0] else None)  # sizes come from grad and mask

    def gradient_by(op: str):
        def gradient(ctx, grad):
            mask, = ctx.saved_tensors
            return (getattr(torch.ops.skelemix, op)(grad, mask) if ctx.needs_input_grad[0] else None), None
        return gradient

    torch.library.register_autograd(f"skelemix::{forward}", gradient_by(backward), setup_context=setup_context)
    torch.library.register_autograd(f"skelemix::{backward}", gradient_by(forward), setup_context=setup_context)


def _register_cpp() -> None:
    @torch.library.register_fake("skelemix::mask_pool")
    def _(x, mask):
        torch_check("skelemix::mask_pool", _forward_checks(x, mask))
        return x.new_empty((x.shape[0], 2, x.shape[1]))

    @torch.library.register_fake("skelemix::_mask_pool_backward")
    def _(grad, mask):
        torch_check("skelemix::_mask_pool_backward", _backward_checks(grad, mask))
        return grad.new_empty((grad.shape[0], grad.shape[2], mask.shape[1], mask.shape[2]))

    _register_autograd("mask_pool", "_mask_pool_backward")


def _forward_triton(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from ..kernels import mask_pool as kernels

    torch_check("skelemix::mask_pool_triton", _forward_checks(x, mask, triton=True))
    return kernels.forward(x, mask)


def _backward_triton(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from ..kernels import mask_pool as kernels

    torch_check("skelemix::_mask_pool_backward_triton", _backward_checks(grad, mask, triton=True))
    return kernels.backward(grad, mask)


def _register_triton() -> None:
    from torch.library import triton_op

    triton_op("skelemix::mask_pool_triton", mutates_args=())(_forward_triton)
    triton_op("skelemix::_mask_pool_backward_triton", mutates_args=())(_backward_triton)
    _register_autograd("mask_pool_triton", "_mask_pool_backward_triton")


if _extension.HAS_CPP:
    _register_cpp()
