"""Batched pretraining augmentations and input views (REFERENCE.md 1.5, 1.6).

Every function takes a batch ``(N, C, T, V, M)`` on any device, keeps its dtype (float32 in practice; the
official feeders drifted to float64) and draws one set of random parameters per sample from a CPU torch
generator (the global one unless given), so results do not depend on the device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .graph import Layout, get_layout

VIEWS = ("joint", "motion", "bone")


def _check_batch(x: torch.Tensor, name: str = "x"):
    if x.dim() != 5:
        raise ValueError(f"{name} must have shape (N, C, T, V, M); got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor; got {x.dtype}")


def shear(x: torch.Tensor, amplitude: float = 0.5, generator=None) -> torch.Tensor:
    """``x'[c] = sum_j S[c, j] x[j]`` with ``S = [[1, a0, b0], [a1, 1, b1], [a2, b2, 1]]``, a, b ~ U(-r, r).

    One matrix per sample, shared by its frames and bodies. ``amplitude <= 0`` is the identity.
    """
    _check_batch(x)
    if amplitude <= 0:
        return x
    if x.shape[1] != 3:
        raise ValueError(f"shear needs 3 coordinates per joint; x has C={x.shape[1]}")
    N = x.shape[0]
    ab = (torch.rand(N, 2, 3, generator=generator) * 2 - 1) * amplitude  # [:, 0] = a0..a2, [:, 1] = b0..b2
    S = torch.eye(3).repeat(N, 1, 1)
    S[:, 0, 1], S[:, 1, 0], S[:, 2, 0] = ab[:, 0, 0], ab[:, 0, 1], ab[:, 0, 2]
    S[:, 0, 2], S[:, 1, 2], S[:, 2, 1] = ab[:, 1, 0], ab[:, 1, 1], ab[:, 1, 2]
    return torch.einsum("ncj,njtvm->nctvm", S.to(x), x)


def temporal_shift(x: torch.Tensor, ratio: int = 6, generator=None) -> torch.Tensor:
    """Random shift by up to ``p = T // ratio`` frames with mirrored borders (the official ``temperal_crop``).

    Equivalent to ``np.pad(x, p, 'symmetric')[:, s:s+T]`` with ``s`` uniform in ``[0, 2p]`` per sample.
    ``ratio <= 0`` is the identity.
    """
    _check_batch(x)
    if ratio <= 0:
        return x
    N, _, T, _, _ = x.shape
    p = T // ratio
    if p == 0:
        return x
    start = torch.randint(0, 2 * p + 1, (N, 1), generator=generator)
    j = start + torch.arange(T)[None] - p  # frame index in the unpadded sequence, may fall outside [0, T)
    j = torch.where(j < 0, -j - 1, j)  # symmetric: -1 -> 0, -2 -> 1, ...
    j = torch.where(j >= T, 2 * T - 1 - j, j)  # T -> T-1, T+1 -> T-2, ...
    index = j.to(x.device)[:, None, :, None, None].expand(-1, x.shape[1], -1, x.shape[3], x.shape[4])
    return torch.gather(x, 2, index)


def resize(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Linear resize of the time axis to ``frames`` (half-pixel centres, edge clamping, as cv2.resize)."""
    _check_batch(x)
    N, C, T, V, M = x.shape
    if T == frames:
        return x
    flat = x.permute(0, 1, 3, 4, 2).reshape(N, C * V * M, T)
    out = F.interpolate(flat, size=frames, mode="linear", align_corners=False)
    return out.reshape(N, C, V, M, frames).permute(0, 1, 4, 2, 3).contiguous()


def pretrain_augment(x: torch.Tensor, shear_amplitude: float = 0.5, temporal_ratio: int = 6,
                     frames: int | None = None, generator=None) -> torch.Tensor:
    """One pretraining view: ``shear(temporal_shift(resize(x, frames)))``, as ``Feeder_multi``'s ``aug``."""
    if frames is not None:
        x = resize(x, frames)
    return shear(temporal_shift(x, temporal_ratio, generator), shear_amplitude, generator)


def to_view(x: torch.Tensor, view: str, layout: str | Layout = "ntu-rgb+d") -> torch.Tensor:
    """The input stream: ``joint`` (identity), ``motion`` (frame differences, last frame 0) or ``bone``
    (joint minus its parent; the root's bone is 0)."""
    _check_batch(x)
    if view == "joint":
        return x
    if view == "motion":
        return torch.cat([x[:, :, 1:] - x[:, :, :-1], torch.zeros_like(x[:, :, :1])], dim=2)
    if view == "bone":
        layout = get_layout(layout)
        if x.shape[3] != layout.num_joints:
            raise ValueError(f"bone view of layout {layout.name!r} needs V={layout.num_joints}; got {x.shape[3]}")
        return x - x[:, :, :, layout.parents()]
    raise ValueError(f"view must be one of {', '.join(VIEWS)}; got {view!r}")
