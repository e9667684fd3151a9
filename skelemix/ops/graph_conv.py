"""Spatial graph convolution of one ST-GCN block. Only the eager reference exists so far."""
from __future__ import annotations

import torch

from .. import reference
from . import _triton
from ._impl import select

_IMPLEMENTATIONS = {"eager": reference.graph_conv, "triton": _triton.graph_conv}


def graph_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
               impl: str = "auto") -> torch.Tensor:
    """See :func:`skelemix.reference.graph_conv` for shapes and semantics."""
    return select("graph_conv", impl, x.device, _IMPLEMENTATIONS, x.dtype)(x, weight, bias, A)
