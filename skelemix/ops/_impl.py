"""Choosing an implementation of a fused op: ``impl`` in ``auto | eager | cpp | cuda | triton``.

``eager`` is the reference in :mod:`skelemix.reference`; ``cpp`` is the C++ CPU kernel and ``cuda`` the
C++ CUDA kernel of the same ``torch.ops.skelemix`` op; ``triton`` is the ``triton_op``. Only ``auto``
falls back: an explicitly requested implementation that is missing raises, naming what is missing and
how to get it. On CUDA, ``auto`` also skips an implementation until it has passed its self-check against the
reference on this machine (:mod:`skelemix.selfcheck`); explicit choices run unchecked.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .. import _extension, selfcheck

IMPLS = ("auto", "eager", "cpp", "cuda", "triton")
# What impl="auto" tries, best first, by the device of the inputs. On CUDA the C++ kernels come first: no GPU
# benchmark has compared them with the Triton ones yet (docs/PERFORMANCE.md), and they also take float64.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "eager"), "cpu": ("cpp", "eager")}
_AUTO_UNSUPPORTED = {"triton": (torch.float64,)}  # dtypes an impl refuses, which auto then skips
_DEVICE_OF_IMPL = {"cpp": "cpu", "cuda": "cuda", "triton": "cuda"}


def register_no_double_backward(op: str, backward_op: str) -> None:
    """Make differentiating ``backward_op`` (a backward op without a gradient of its own) raise a clear error."""
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(f"{op} does not support double backward through {backward_op} (it has no "
                                  "gradient); use impl='eager' for higher-order gradients")

    torch.library.register_autograd(backward_op, backward, setup_context=setup_context)


_TRITON_REGISTERED: set[str] = set()


def register_triton_once(op: str, register: Callable[[], None]) -> None:
    """Run ``register`` (the ``triton_op`` registrations of ``op``) the first time a Triton op of ``op`` runs:
    registering imports triton, which ``import skelemix`` never does. Raises if triton is not importable."""
    if op not in _TRITON_REGISTERED:
        importable, _, why = _extension._triton()
        if not importable:
            raise RuntimeError(f"skelemix triton ops: {why}")
        register()
        _TRITON_REGISTERED.add(op)


def check_impl(impl: str) -> str:
    """Validate the name of an implementation (for configs and command lines)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    return impl


def _usable(name: str, device: torch.device) -> bool:
    wanted = _DEVICE_OF_IMPL.get(name)
    if wanted is not None and not (device.type == wanted or (name == "triton" and _extension.triton_interpret())):
        return False
    return _extension.available(name)[0]


def _auto_may_use(name: str, device: torch.device, implementations, dtype) -> bool:
    return (name != "eager" and name in implementations and dtype not in _AUTO_UNSUPPORTED.get(name, ())
            and _usable(name, device))


def auto_candidates(device: torch.device, implementations, dtype: torch.dtype | None = None) -> list[str]:
    """The implementations ``impl="auto"`` may use for ``device`` and ``dtype``, best first, before their
    self-checks; ``eager`` always comes last."""
    names = [name for name in _AUTO_ORDER.get(device.type, ()) if _auto_may_use(name, device, implementations, dtype)]
    return names + ["eager"]


def choose(op: str, impl: str, device: torch.device, implementations: Mapping[str, Callable],
           dtype: torch.dtype | None = None) -> str:
    """The name of the implementation that runs ``op`` with ``impl`` for inputs on ``device`` (of ``dtype``)."""
    check_impl(impl)
    if impl == "auto":  # a plain loop that stops at the first usable name: torch.compile traces this
        for name in _AUTO_ORDER.get(device.type, ()):
            if (_auto_may_use(name, device, implementations, dtype)
                    and selfcheck.trusted(op, name, device, dtype, implementations[name],
                                          _AUTO_ORDER[device.type])):
                return name
        return "eager"
    if impl not in implementations:
        have = ", ".join(sorted(implementations))
        raise NotImplementedError(f"skelemix.ops.{op} has no impl={impl!r} yet; available: {have}")
    ok, why = _extension.available(impl)
    if not ok:
        raise RuntimeError(f"skelemix.ops.{op}: impl={impl!r} is not available on this install: {why}")
    wanted = _DEVICE_OF_IMPL.get(impl)
    if wanted is not None and device.type != wanted and not (impl == "triton" and _extension.triton_interpret()):
        raise ValueError(f"skelemix.ops.{op}: impl={impl!r} runs on {wanted} tensors; got inputs on {device}")
    return impl


def select(op: str, impl: str, device: torch.device, implementations: Mapping[str, Callable],
           dtype: torch.dtype | None = None) -> Callable:
    """Return the function that runs ``op`` with ``impl`` for inputs on ``device`` (of ``dtype``)."""
    return implementations[choose(op, impl, device, implementations, dtype)]
