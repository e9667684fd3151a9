"""Fused ops with a selectable implementation (``impl="auto" | "eager" | "cpp" | "cuda" | "triton"``)."""
from ._impl import IMPLS, check_impl
from .graph_conv import graph_conv
from .mask_pool import mask_pool
from .skelemix_gather import skelemix_gather

__all__ = ["IMPLS", "check_impl", "graph_conv", "mask_pool", "skelemix_gather"]
