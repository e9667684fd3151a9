"""Batched SkeleMix gather: ``skelemix.ops.skelemix_gather(x, partner, joints, span, block, impl="auto")``.

The C++ op ``torch.ops.skelemix.skelemix_gather`` (schema in csrc/skelemix_gather.cpp, kernels in csrc/cpu and
csrc/cuda) gets its fake kernel here. It is forward only: the mixing runs under ``no_grad`` on augmented
views, so its registered backward raises a clear error (``impl="eager"`` stays differentiable).

Checks: shapes, dtypes and devices are checked by the wrapper, the fake kernel and the C++ kernels with the
same messages. The values (partner in ``[0, N)``, spans in ``[0, ceil(T / block)]``) are data, so the fake
kernel cannot see them: the C++ kernels check them on the host before touching x (on CUDA this is one small
device-to-host copy of partner and span, a sync); for ``impl="eager"`` and ``"triton"`` the wrapper checks them the
same way, except while being traced by ``torch.compile``. ``check_values=False`` skips these checks where they
would synchronise (every CUDA implementation), for callers whose values are valid by construction (SkeleMix's
own draws): the CUDA and Triton kernels then still never read out of bounds (a bad partner copies the sample
itself), but an invalid value gives an unspecified mix.

The Triton op ``skelemix::skelemix_gather_triton`` (kernel in :mod:`skelemix.kernels.skelemix_gather`) takes the
same shape checks and the region of :func:`skelemix.reference.block_region`.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .. import _extension, reference
from ._checks import Check, floating, raise_first, same_device, torch_check
from ._impl import register_triton_once, select


def _checks(x: torch.Tensor, partner: torch.Tensor, joints: torch.Tensor, span: torch.Tensor,
            block: int) -> Iterator[Check]:
    """Messages match csrc/skelemix_gather.cpp. A copy: the Triton op takes float64 too."""
    yield x.dim() == 5, ValueError, lambda: f"x must be 5-D (N, C, T, V, M); got shape {list(x.shape)}"
    yield from floating(x, "x")
    yield partner.dim() == 2, ValueError, lambda: f"partner must be 2-D (R, N); got shape {list(partner.shape)}"
    yield partner.dtype == torch.int64, TypeError, lambda: f"partner must be an int64 tensor; got {partner.dtype}"
    yield joints.dim() == 3, ValueError, lambda: f"joints must be 3-D (R, G, V); got shape {list(joints.shape)}"
    yield joints.dtype == torch.bool, TypeError, lambda: f"joints must be a bool tensor; got {joints.dtype}"
    yield span.dim() == 3, ValueError, lambda: f"span must be 3-D (R, G, 2); got shape {list(span.shape)}"
    yield span.dtype == torch.int64, TypeError, lambda: f"span must be an int64 tensor; got {span.dtype}"
    for name, t in (("partner", partner), ("joints", joints), ("span", span)):
        yield same_device(t, name, x)
    N, V, R, G = x.shape[0], x.shape[3], partner.shape[0], joints.shape[1]
    yield partner.shape[1] == N, ValueError, lambda: (
        f"partner must have shape (R, N) with N={N} (the batch size of x); got shape {list(partner.shape)}")
    yield joints.shape[0] == R and joints.shape[2] == V, ValueError, lambda: (
        f"joints must have shape (R, G, V) = ({R}, G, {V}) to match partner and x; got shape {list(joints.shape)}")
    yield G == 1 or G == N, ValueError, lambda: (
        f"joints has G={G} groups; G must be 1 (one region for the batch) or N={N} (one per sample)")
    yield span.shape[0] == R and span.shape[1] == G and span.shape[2] == 2, ValueError, lambda: (
        f"span must have shape (R, G, 2) = ({R}, {G}, 2) to match joints; got shape {list(span.shape)}")
    yield block >= 1, ValueError, lambda: f"block must be >= 1; got {block}"


def _value_error(partner: torch.Tensor, span: torch.Tensor, N: int, T: int, block: int) -> str | None:
    """The first out-of-range partner or span as a message (None when all are valid); reads them on the host."""
    blocks = -(-T // block)
    p = partner.cpu()
    bad = ((p < 0) | (p >= N)).nonzero()
    if len(bad):
        r, n = bad[0].tolist()
        return f"partner must hold sample indices in [0, N={N}); got partner[{r}, {n}] = {int(p[r, n])}"
    s = span.cpu()
    bad = ((s[..., 0] < 0) | (s[..., 0] > s[..., 1]) | (s[..., 1] > blocks)).nonzero()
    if len(bad):
        r, g = bad[0].tolist()
        return (f"span must hold block ranges [start, end) with 0 <= start <= end <= ceil(T / block) = {blocks} "
                f"(T={T}, block={block}); got span[{r}, {g}] = {s[r, g].tolist()}")
    return None


def _check_values(x, partner, span, block):
    if not torch.compiler.is_compiling():  # values are data: a traced graph cannot branch on them
        message = _value_error(partner, span, x.shape[0], x.shape[2], block)
        if message is not None:
            raise ValueError(f"skelemix.ops.skelemix_gather: {message}")


def _eager(x, partner, joints, span, block, check_values=True):
    if check_values or x.device.type == "cpu":  # on the host checking costs no sync, and indexing needs it
        _check_values(x, partner, span, block)
    return reference.skelemix_gather(x, partner, joints, span, block)


def _triton(x, partner, joints, span, block, check_values=True):
    if check_values:
        _check_values(x, partner, span, block)
    register_triton_once("skelemix_gather", _register_triton)
    return torch.ops.skelemix.skelemix_gather_triton(x, partner, joints, span, block)


def _cpp(x, partner, joints, span, block, check_values=True):
    return torch.ops.skelemix.skelemix_gather(x, partner, joints, span, block, check_values)


# "cpp" and "cuda" are always listed: select() then checks _extension.available() and, when the extension is
# missing, raises an error that says how to build it (rather than "no such impl").
_IMPLEMENTATIONS = {"eager": _eager, "cpp": _cpp, "cuda": _cpp, "triton": _triton}


def skelemix_gather(x: torch.Tensor, partner: torch.Tensor, joints: torch.Tensor, span: torch.Tensor, block: int,
                    impl: str = "auto", check_values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Build ``R`` SkeleMix batches from ``x`` in one pass.

    Args:
        x: ``(N, C, T, V, M)`` float32, float64, float16 or bfloat16.
        partner: ``(R, N)`` int64 in ``[0, N)`` on the device of ``x``.
        joints: ``(R, G, V)`` bool, ``G`` in ``{1, N}``; ``(R, V)`` is short for ``G == 1``.
        span: ``(R, G, 2)`` int64 ``[start, end)`` in blocks; ``(R, 2)`` is short for ``G == 1``.
        block: frames per block (the encoder's temporal stride), ``>= 1``.
        impl: ``auto`` (C++ on CPU when built, else eager), ``eager``, ``cpp``, ``cuda`` or ``triton``.
        check_values: check that partner and span hold valid values (on CUDA a small copy to the host, which
            waits for the device). False skips that for values valid by construction; the kernels then still
            stay in bounds, but invalid values give an unspecified mix.

    Returns:
        ``(mixed, mask)``: ``(R * N, C, T, V, M)`` in the dtype of ``x`` and ``(R, N, ceil(T / block), V)`` bool;
        see :func:`skelemix.reference.skelemix_gather`. Not differentiable.
    """
    args = (x, partner, joints, span)
    if not all(isinstance(t, torch.Tensor) for t in args):
        raise TypeError("skelemix.ops.skelemix_gather: x, partner, joints and span must be tensors; got "
                        + ", ".join(type(t).__name__ for t in args))
    if joints.dim() == 2:
        joints = joints[:, None]
    if span.dim() == 2:
        span = span[:, None]
    raise_first("skelemix_gather", _checks(x, partner, joints, span, block))
    fn = select("skelemix_gather", impl, x.device, _IMPLEMENTATIONS, x.dtype)
    return fn(x, partner, joints, span, block, bool(check_values))


def _register_cpp() -> None:
    @torch.library.register_fake("skelemix::skelemix_gather")
    def _(x, partner, joints, span, block, check_values=True):
        torch_check("skelemix::skelemix_gather", _checks(x, partner, joints, span, block))
        N, C, T, V, M = x.shape
        R = partner.shape[0]
        mixed = x.new_empty((R * N, C, T, V, M))
        mask = joints.new_empty((R, N, (T + block - 1) // block, V))
        return mixed, mask

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, grad_mixed, grad_mask):
        # Without a registration torch would warn and silently return no gradient for x.
        raise RuntimeError("skelemix::skelemix_gather has no backward (SkeleMix mixes views under no_grad); detach x, "
                           "or use impl='eager' to differentiate through the mixing")

    torch.library.register_autograd("skelemix::skelemix_gather", backward, setup_context=setup_context)


def _gather_triton(x: torch.Tensor, partner: torch.Tensor, joints: torch.Tensor, span: torch.Tensor,
                   block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape, dtype and device checks only: the wrapper checks the values (a host synchronisation)."""
    from ..kernels import skelemix_gather as kernels

    torch_check("skelemix::skelemix_gather_triton", _checks(x, partner, joints, span, block))
    N, _, T, V, _ = x.shape
    mask = reference.block_region(joints, span, -(-T // block)).expand(partner.shape[0], N, -1, V).contiguous()
    return kernels.gather(x, partner, joints, span, block), mask


def _register_triton() -> None:
    from torch.library import triton_op

    triton_op("skelemix::skelemix_gather_triton", mutates_args=(), schema=(
        "(Tensor x, Tensor partner, Tensor joints, Tensor span, int block) -> (Tensor, Tensor)"))(_gather_triton)


if _extension.HAS_CPP:
    _register_cpp()
