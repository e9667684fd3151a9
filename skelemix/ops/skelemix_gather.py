"""Batched SkeleMix gather (paste partner fragments). Only the eager reference exists so far."""
from __future__ import annotations

import torch

from .. import reference
from ._impl import select

_IMPLEMENTATIONS = {"eager": reference.skelemix_gather}


def skelemix_gather(x: torch.Tensor, partner: torch.Tensor, region: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """See :func:`skelemix.reference.skelemix_gather` for shapes and semantics."""
    return select("skelemix_gather", impl, x.device, _IMPLEMENTATIONS)(x, partner, region)
