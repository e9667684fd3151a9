"""BatchNorm, dropout, residual add and ReLU in one pass: ``skelemix.ops.bn_epilogue(x, weight, bias, ...)``.

The C++ op ``torch.ops.skelemix.bn_epilogue`` (schema in csrc/bn_epilogue.cpp, kernels in csrc/cpu and
csrc/cuda) gets its PT2 surface here: fake kernels for it and for ``_bn_epilogue_backward``, and autograd for
the forward (double backward raises). Dropout draws its mask from Philox4x32-10 keyed by the seed with the element
index as counter (:func:`skelemix.reference.dropout_keep`, the stream of Triton's ``tl.randint``), so the backward
regenerates the mask instead of storing it, and the seed is a device tensor drawn on the device, which keeps the
op CUDA-graph capturable.

The Triton ops ``skelemix::bn_epilogue_triton`` and ``skelemix::_bn_epilogue_backward_triton`` (kernels in
:mod:`skelemix.kernels.bn_epilogue`) have the schemas of the C++ pair and take the same checks and autograd.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .. import _extension, reference
from ._checks import Check, floating, raise_first, same_device, same_dtype, torch_check
from ._impl import register_no_double_backward, register_triton_once, select


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of weight, bias and statistics for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_checks(t: torch.Tensor, name: str, x: torch.Tensor) -> Iterator[Check]:
    C, acc = x.shape[1], acc_dtype(x.dtype)
    yield t.dim() == 1 and t.shape[0] == C, ValueError, lambda: (
        f"{name} must have shape ({C},) (the channels of x, shape {list(x.shape)}); got shape {list(t.shape)}")
    yield t.dtype == acc, TypeError, lambda: (
        f"{name} must be {acc} (the accumulation dtype of {x.dtype} x); got {t.dtype}")
    yield same_device(t, name, x)


def _like_x_checks(t: torch.Tensor, name: str, x: torch.Tensor) -> Iterator[Check]:
    yield t.shape == x.shape, ValueError, lambda: (
        f"{name} must have the shape of x {list(x.shape)}; got shape {list(t.shape)}")
    yield same_dtype(t, name, x)
    yield same_device(t, name, x)


def _common_checks(x, weight, seed, eps, p, triton) -> Iterator[Check]:
    """Messages match csrc/bn_epilogue.cpp; ``triton`` adds the Triton ops' refusal of float64."""
    yield x.dim() >= 2, ValueError, lambda: f"x must be at least 2-D (N, C, *); got shape {list(x.shape)}"
    yield from floating(x, "x", triton)
    yield from _channel_checks(weight, "weight", x)
    yield seed.numel() == 1 and seed.dtype == torch.int64, TypeError, lambda: (
        f"seed must be an int64 tensor of one element; got {seed.dtype} of shape {list(seed.shape)}")
    yield same_device(seed, "seed", x)
    yield eps >= 0, ValueError, lambda: f"eps must be >= 0; got {eps}"
    yield 0 <= p < 1, ValueError, lambda: f"p (dropout probability) must be in [0, 1); got {p}"


def _forward_checks(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p,
                    triton: bool = False) -> Iterator[Check]:
    yield from _common_checks(x, weight, seed, eps, p, triton)
    yield from _channel_checks(bias, "bias", x)
    if residual is not None:
        yield from _like_x_checks(residual, "residual", x)
    yield (stats_mean is None) == (stats_var is None), ValueError, lambda: (
        "stats_mean and stats_var must both be given (fixed statistics) or both be None (batch statistics)")
    if stats_mean is not None and stats_var is not None:
        yield from _channel_checks(stats_mean, "stats_mean", x)
        yield from _channel_checks(stats_var, "stats_var", x)


def _backward_checks(grad, x, y, weight, mean, var, seed, eps, p, triton: bool = False) -> Iterator[Check]:
    yield from _common_checks(x, weight, seed, eps, p, triton)
    yield from _like_x_checks(grad, "grad", x)
    yield from _like_x_checks(y, "y", x)
    yield from _channel_checks(mean, "mean", x)
    yield from _channel_checks(var, "var", x)


def _cpp(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p, relu):
    return torch.ops.skelemix.bn_epilogue(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p, relu)


def _triton(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p, relu):
    register_triton_once("bn_epilogue", _register_triton)
    return torch.ops.skelemix.bn_epilogue_triton(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p, relu)


# "cpp" and "cuda" are always listed: select() then checks _extension.available() and, when the extension is
# missing, raises an error that says how to build it (rather than "no such impl").
_IMPLEMENTATIONS = {"eager": reference.bn_epilogue, "cpp": _cpp, "cuda": _cpp, "triton": _triton}


def draw_seed(device) -> torch.Tensor:
    """A dropout seed: int64 ``(1,)`` drawn on ``device`` from its default generator (on CUDA no host sync,
    and graph-safe: a captured draw advances on every replay)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def bn_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None,
                stats_mean: torch.Tensor | None = None, stats_var: torch.Tensor | None = None,
                seed: torch.Tensor | None = None, eps: float = 1e-5, p: float = 0.0, relu: bool = True,
                impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``relu(dropout_p(batch_norm(x)) + residual)`` in one pass over ``x``; see
    :func:`skelemix.reference.bn_epilogue` for the exact semantics.

    Args:
        x: ``(N, C, *)`` float32, float64, float16 or bfloat16.
        weight, bias: ``(C,)``, float64 for float64 ``x``, else float32 (BatchNorm's affine parameters).
        residual: ``x``'s shape, added after dropout; under autocast it is cast to ``x``'s dtype.
        stats_mean, stats_var: fixed statistics (evaluation), or None for ``x``'s batch statistics (training).
        seed: int64 ``(1,)`` on ``x``'s device; None draws one (:func:`draw_seed`) when ``p > 0``.
        eps: BatchNorm's eps. p: dropout probability in ``[0, 1)``. relu: apply the ReLU.
        impl: ``auto``, ``eager``, ``cpp``, ``cuda`` or ``triton``.

    Returns:
        ``(y, mean, var)``: the batch mean and biased variance (for the running statistics; not
        differentiable) in training mode, two empty tensors otherwise. ``x``, ``weight``, ``bias`` and
        ``residual`` are differentiable.
    """
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"skelemix.ops.bn_epilogue: {name} must be a tensor; got {type(t).__name__}")
    if seed is None:
        seed = draw_seed(x.device) if p > 0 else torch.zeros(1, dtype=torch.int64, device=x.device)
    if residual is not None and residual.dtype != x.dtype and torch.is_autocast_enabled(x.device.type):
        residual = residual.to(x.dtype)
    raise_first("bn_epilogue", _forward_checks(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p))
    fn = select("bn_epilogue", impl, x.device, _IMPLEMENTATIONS, x.dtype)
    return fn(x, weight, bias, residual, stats_mean, stats_var, seed, float(eps), float(p), bool(relu))


def _register_autograd(forward: str, backward_op: str) -> None:
    """Autograd for ``skelemix::<forward>`` through ``skelemix::<backward_op>`` (the C++ pair or the Triton pair);
    double backward raises."""
    def setup_context(ctx, inputs, output):
        x, weight, bias, residual, stats_mean, stats_var, seed, eps, p, relu = inputs
        y, mean, var = output
        ctx.batch_stats = stats_mean is None
        ctx.eps, ctx.p, ctx.relu = eps, p, relu
        ctx.mark_non_differentiable(mean, var)
        if ctx.batch_stats:
            stats_mean, stats_var = mean, var
        # y decides the ReLU's gradient; x, weight and the statistics give xhat and the scale.
        ctx.save_for_backward(x, y, weight, stats_mean, stats_var, seed)

    def backward(ctx, grad, _grad_mean, _grad_var):
        x, y, weight, mean, var, seed = ctx.saved_tensors
        need = list(ctx.needs_input_grad[:4])
        if not any(need):
            return (None,) * 10
        grads = getattr(torch.ops.skelemix, backward_op)(grad, x, y, weight, mean.detach(), var.detach(), seed,
                                                         ctx.eps, ctx.p, ctx.relu, ctx.batch_stats, need)
        return (*(g if wanted else None for g, wanted in zip(grads, need)),) + (None,) * 6

    torch.library.register_autograd(f"skelemix::{forward}", backward, setup_context=setup_context)
    register_no_double_backward(f"skelemix::{forward}", f"skelemix::{backward_op}")


def _register_cpp() -> None:
    @torch.library.register_fake("skelemix::bn_epilogue")
    def _(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p, relu):
        torch_check("skelemix::bn_epilogue",
                    _forward_checks(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p))
        stats = (x.shape[1],) if stats_mean is None else (0,)
        return x.new_empty(x.shape), weight.new_empty(stats), weight.new_empty(stats)

    @torch.library.register_fake("skelemix::_bn_epilogue_backward")
    def _(grad, x, y, weight, mean, var, seed, eps, p, relu, batch_stats, output_mask):
        torch_check("skelemix::_bn_epilogue_backward", _backward_checks(grad, x, y, weight, mean, var, seed, eps, p))
        need_x, need_w, need_b, need_r = output_mask
        return (x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,)),
                weight.new_empty(weight.shape if need_b else (0,)), x.new_empty(x.shape if need_r else (0,)))

    _register_autograd("bn_epilogue", "_bn_epilogue_backward")


def _bn_epilogue_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None,
                        stats_mean: torch.Tensor | None, stats_var: torch.Tensor | None, seed: torch.Tensor,
                        eps: float, p: float, relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import bn_epilogue as kernels

    torch_check("skelemix::bn_epilogue_triton",
                _forward_checks(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p, triton=True))
    return kernels.forward(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p, relu)


def _backward_triton(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                     var: torch.Tensor, seed: torch.Tensor, eps: float, p: float, relu: bool, batch_stats: bool,
                     output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import bn_epilogue as kernels

    op = "skelemix::_bn_epilogue_backward_triton"
    torch_check(op, _backward_checks(grad, x, y, weight, mean, var, seed, eps, p, triton=True))
    torch._check(len(output_mask) == 4, lambda: f"{op}: output_mask must have 4 entries; got {len(output_mask)}")
    return kernels.backward(grad, x, y, weight, mean, var, seed, eps, p, relu, batch_stats, output_mask)


def _register_triton() -> None:
    from torch.library import triton_op

    triton_op("skelemix::bn_epilogue_triton", mutates_args=(), schema=(
        "(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor? stats_mean, Tensor? stats_var, "
        "Tensor seed, float eps, float p, bool relu) -> (Tensor, Tensor, Tensor)"))(_bn_epilogue_triton)
    triton_op("skelemix::_bn_epilogue_backward_triton", mutates_args=(), schema=(
        "(Tensor grad, Tensor x, Tensor y, Tensor weight, Tensor mean, Tensor var, Tensor seed, float eps, "
        "float p, bool relu, bool batch_stats, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)"))(
        _backward_triton)
    _register_autograd("bn_epilogue_triton", "_bn_epilogue_backward_triton")


if _extension.HAS_CPP:
    _register_cpp()
