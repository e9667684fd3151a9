"""A trained encoder as a feature extractor: :class:`Encoder` and :func:`load_encoder`.

It takes the sequences ``python -m skelemix.data`` prepares, applies the input view it was trained on, and gives
the pooled features that linear evaluation sees. ``python -m skelemix.embed`` writes them for whole datasets;
:mod:`skelemix.export` saves the encoder as a standalone file.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .augment import to_view
from .graph import Layout


class Encoder(nn.Module):
    """A trained encoder as a feature extractor: prepared sequences ``x (N, C, T, V, M)`` -> pooled features
    ``(N, D)``. It applies the input view it was trained on (joint, motion or bone) itself, so ``x`` is what
    ``python -m skelemix.data`` prepares. Built by :func:`load_encoder`, in eval mode.

    ``layout`` (:class:`~skelemix.graph.Layout`), ``channels`` (``"x,y,z"``, ``"x,y"`` or ``"x,y,score"``),
    ``frames`` (of the training data), ``view`` and ``feature_dim`` describe what it takes and gives;
    ``recipe`` is how its training samples were prepared (None when the checkpoint does not say).
    """

    def __init__(self, stgcn: nn.Module, view: str, channels: str, frames: int, recipe: dict | None = None):
        super().__init__()
        self.stgcn, self.view, self.channels, self.frames, self.recipe = stgcn, view, channels, frames, recipe

    @property
    def layout(self) -> Layout:
        return self.stgcn.graph.layout

    @property
    def feature_dim(self) -> int:
        return self.stgcn.hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stgcn(to_view(x, self.view, self.layout))

    def extra_repr(self) -> str:
        return (f"layout={self.layout.name!r}, channels={self.channels!r}, view={self.view!r}, "
                f"feature_dim={self.feature_dim}")


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu", impl: str = "auto",
                 config: str | None = None, overrides: list[str] | None = None) -> Encoder:
    """The encoder of a checkpoint as an :class:`Encoder` in eval mode, with the graph of its layout.

    ``path``: a checkpoint of ``python -m skelemix.train``, a classifier of ``python -m skelemix.evaluate`` or an
    official SkeleMixCLR state dict (its architecture from ``config``, a YAML file, and ``overrides``,
    ``section.key=value`` strings, as ``evaluate --config/--set``). The weights are loaded with
    ``weights_only=True``; the projection head or classifier is left out. ``impl`` picks the fused kernels
    (see :mod:`skelemix.ops`).
    """
    from .config import model_input
    from .pretrained import build_encoder, load_pretrained

    pre = load_pretrained(path, config, overrides)
    with torch.random.fork_rng(devices=[]):  # build_encoder seeds the initialisation: leave the caller's RNG alone
        stgcn = build_encoder(pre, None, impl=impl)
    _, channels = model_input(pre.config.model)
    encoder = Encoder(stgcn, pre.config.data.view, channels, pre.config.data.frames, pre.data_recipe)
    encoder.path = pre.path
    return encoder.to(device).eval()
