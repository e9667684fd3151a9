"""Argument checks shared by the fused ops: one list per op drives every layer.

Each op writes its checks once, as ``(condition, exception type, message)`` triples evaluated lazily and in order,
with messages that match its C++ kernels (``csrc/<op>.cpp``). The public wrapper raises the first failing one
(:func:`raise_first`); the fake kernels and the Triton ops feed them to ``torch._check`` (:func:`torch_check`),
so a traced graph, a Triton op and the C++ kernels report the same message.
"""
from __future__ import annotations

from typing import Callable, Iterator, Tuple

import torch

Check = Tuple[object, type, Callable[[], str]]
FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The Triton kernels accumulate in fp32, which would silently lose fp64 precision: they refuse float64.
TRITON_FLOATING = (torch.float32, torch.float16, torch.bfloat16)


def floating(t: torch.Tensor, name: str, triton: bool = False) -> Iterator[Check]:
    """``t`` is floating point and, for a Triton op, not float64."""
    yield t.dtype in FLOATING, TypeError, lambda: (
        f"{name} must be floating point (float32, float64, float16 or bfloat16); got {t.dtype}")
    if triton:
        yield t.dtype in TRITON_FLOATING, TypeError, lambda: (
            f"impl='triton' takes float32, float16 or bfloat16 {name}; got {t.dtype} (use impl='eager', 'cpp' or "
            "'cuda' for it)")


def same_dtype(t: torch.Tensor, name: str, x: torch.Tensor) -> Check:
    return t.dtype == x.dtype, TypeError, lambda: f"{name} must have the dtype of x ({x.dtype}); got {t.dtype}"


def same_device(t: torch.Tensor, name: str, x: torch.Tensor, x_name: str = "x") -> Check:
    return t.device == x.device, ValueError, lambda: (
        f"{x_name} and {name} must be on the same device; got {x_name} on {x.device} and {name} on {t.device}")


def raise_first(op: str, checks: Iterator[Check]) -> None:
    """Raise the first failing check as its exception type, prefixed ``skelemix.ops.<op>: ``."""
    for ok, exc, message in checks:
        if not ok:
            raise exc(f"skelemix.ops.{op}: {message()}")


def torch_check(op: str, checks: Iterator[Check]) -> None:
    """Every check through ``torch._check`` (fake kernels, Triton ops), prefixed with the op's name."""
    for ok, _, message in checks:
        torch._check(ok, lambda message=message: f"{op}: {message()}")
