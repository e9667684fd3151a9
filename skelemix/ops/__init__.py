"""Fused ops with a selectable implementation (``impl="auto" | "eager" | "cpp" | "cuda" | "triton"``)."""
import importlib

import torch

from .. import parity
from ._impl import IMPLS, check_impl, choose, select
from .bn_epilogue import acc_dtype, bn_epilogue
from .graph_conv import graph_conv
from .mask_pool import mask_pool
from .skelemix_gather import skelemix_gather

__all__ = ["IMPLS", "acc_dtype", "bn_epilogue", "check_impl", "check_impl_available", "decide_auto", "graph_conv",
           "mask_pool", "skelemix_gather"]


def check_impl_available(impl: str, device) -> None:
    """Raise a RuntimeError naming every fused op that cannot run with ``impl`` on ``device`` (a model built
    with an explicit impl uses all of them); ``auto`` always works."""
    check_impl(impl)
    if impl == "auto":
        return
    problems = []
    for name in ("bn_epilogue", "graph_conv", "mask_pool", "skelemix_gather"):
        module = importlib.import_module(f"{__name__}.{name}")  # the module, not the function of that name
        try:
            select(name, impl, torch.device(device), module._IMPLEMENTATIONS)
        except (NotImplementedError, RuntimeError, ValueError) as err:
            problems.append(str(err))
    if problems:
        raise RuntimeError(f"impl={impl!r} cannot run the model here: " + "; ".join(problems))


def decide_auto(device, dtypes=(torch.float32,), ops=parity.OPS) -> dict:
    """Decide now what ``impl="auto"`` runs for each op and dtype on ``device`` (probing where needed,
    :mod:`skelemix.selfcheck`), e.g. before ``torch.compile`` or a CUDA graph capture. Returns
    ``{(op, dtype): implementation}``."""
    device = parity.normal_device(device)
    return {(op, dtype): choose(op, "auto", device, importlib.import_module(f"{__name__}.{op}")._IMPLEMENTATIONS,
                                dtype)
            for op in ops for dtype in dtypes}
