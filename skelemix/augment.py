"""Batched pretraining augmentations and input views (docs/DESIGN.md 1.5, 1.6).

Every function takes a batch ``(N, C, T, V, M)`` on any device, keeps its dtype (float32 in practice; the
official feeders drifted to float64) and draws one set of random parameters per sample from a CPU torch
generator (the global one unless given), so results do not depend on the device.

The draws and their application are separate functions (:func:`draw_augment`, :func:`apply_augment`): the
trainer draws on the host and applies on the device, which then needs no host synchronisation (CUDA graphs).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .graph import Layout, get_layout

VIEWS = ("joint", "motion", "bone")


def _check_batch(x: torch.Tensor, name: str = "x"):
    if x.dim() != 5:
        raise ValueError(f"{name} must have shape (N, C, T, V, M); got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor; got {x.dtype}")


def draw_shear(n: int, amplitude: float = 0.5, generator=None, coords: int = 3, channels: int | None = None
               ) -> torch.Tensor:
    """The ``(n, C, C)`` float32 matrices of :func:`shear` (on the host): the ``coords x coords`` shear of the
    coordinates, and the identity for ``channels - coords`` further channels (a detection score), which it
    leaves as they are. ``C = channels``, by default ``coords``."""
    channels = coords if channels is None else channels
    if coords not in (2, 3) or channels < coords:
        raise ValueError(f"shear takes 2 or 3 coordinates per joint, then other channels; got coords={coords} of "
                         f"{channels} channels")
    S = torch.eye(channels).repeat(n, 1, 1)
    if coords == 3:
        ab = (torch.rand(n, 2, 3, generator=generator) * 2 - 1) * amplitude  # [:, 0] = a0..a2, [:, 1] = b0..b2
        S[:, 0, 1], S[:, 1, 0], S[:, 2, 0] = ab[:, 0, 0], ab[:, 0, 1], ab[:, 0, 2]
        S[:, 0, 2], S[:, 1, 2], S[:, 2, 1] = ab[:, 1, 0], ab[:, 1, 1], ab[:, 1, 2]
    else:  # the x-y block of the 3-D matrix: [[1, a0], [a1, 1]]
        a = (torch.rand(n, 2, generator=generator) * 2 - 1) * amplitude
        S[:, 0, 1], S[:, 1, 0] = a[:, 0], a[:, 1]
    return S


def apply_shear(x: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``x'[n, c] = sum_j S[n, c, j] x[n, j]``."""
    return torch.einsum("ncj,njtvm->nctvm", S.to(x), x)


def _check_coords(C: int, coords: int):
    if coords not in (2, 3) or C < coords:
        raise ValueError(f"shear needs {coords} coordinates per joint; x has C={C}" +
                         (" (2-D data: pass coords=2)" if C == 2 else ""))


def shear(x: torch.Tensor, amplitude: float = 0.5, generator=None, coords: int = 3) -> torch.Tensor:
    """``x'[c] = sum_j S[c, j] x[j]`` with ``S = [[1, a0, b0], [a1, 1, b1], [a2, b2, 1]]``, a, b ~ U(-r, r); for
    2-D data (``coords=2``) ``S = [[1, a0], [a1, 1]]``. Channels after the ``coords`` coordinates (a score)
    are kept.

    One matrix per sample, shared by its frames and bodies. ``amplitude <= 0`` is the identity.
    """
    _check_batch(x)
    if amplitude <= 0:
        return x
    _check_coords(x.shape[1], coords)
    return apply_shear(x, draw_shear(x.shape[0], amplitude, generator, coords, x.shape[1]))


def draw_shift(n: int, frames: int, ratio: int = 6, generator=None) -> torch.Tensor | None:
    """The ``(n, frames)`` int64 source frame of every output frame of :func:`temporal_shift` (on the host), or
    None when the shift is the identity (``ratio <= 0`` or ``frames // ratio == 0``)."""
    p = frames // ratio if ratio > 0 else 0
    if p == 0:
        return None
    start = torch.randint(0, 2 * p + 1, (n, 1), generator=generator)
    j = start + torch.arange(frames)[None] - p  # frame index in the unpadded sequence, may fall outside [0, T)
    j = torch.where(j < 0, -j - 1, j)  # symmetric: -1 -> 0, -2 -> 1, ...
    return torch.where(j >= frames, 2 * frames - 1 - j, j)  # T -> T-1, T+1 -> T-2, ...


def apply_shift(x: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """``x'[n, :, t] = x[n, :, frame[n, t]]``."""
    index = frame.to(x.device)[:, None, :, None, None].expand(-1, x.shape[1], -1, x.shape[3], x.shape[4])
    return torch.gather(x, 2, index)


def temporal_shift(x: torch.Tensor, ratio: int = 6, generator=None) -> torch.Tensor:
    """Random shift by up to ``p = T // ratio`` frames with mirrored borders (the official ``temperal_crop``).

    Equivalent to ``np.pad(x, p, 'symmetric')[:, s:s+T]`` with ``s`` uniform in ``[0, 2p]`` per sample.
    ``ratio <= 0`` is the identity.
    """
    _check_batch(x)
    frame = draw_shift(x.shape[0], x.shape[2], ratio, generator)
    return x if frame is None else apply_shift(x, frame)


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
                     frames: int | None = None, generator=None, coords: int = 3) -> torch.Tensor:
    """One pretraining view: ``shear(temporal_shift(resize(x, frames)))``, as ``Feeder_multi``'s ``aug``."""
    if frames is not None:
        x = resize(x, frames)
    return shear(temporal_shift(x, temporal_ratio, generator), shear_amplitude, generator, coords)


def draw_augment(shape, shear_amplitude: float = 0.5, temporal_ratio: int = 6, generator=None,
                 coords: int = 3) -> dict:
    """The random parameters of one :func:`pretrain_augment` view of a batch of ``shape`` (without resize), drawn
    on the host in the same order: ``{"shift": (N, T) int64, "shear": (N, C, C) float32}``, each left out when
    that augmentation is the identity."""
    N, C, T = shape[:3]
    draws = {}
    frame = draw_shift(N, T, temporal_ratio, generator)
    if frame is not None:
        draws["shift"] = frame
    if shear_amplitude > 0:
        _check_coords(C, coords)
        draws["shear"] = draw_shear(N, shear_amplitude, generator, coords, C)
    return draws


def apply_augment(x: torch.Tensor, draws: dict) -> torch.Tensor:
    """:func:`pretrain_augment` of ``x`` with the parameters of :func:`draw_augment` (on the device of ``x``:
    then it launches device work only)."""
    _check_batch(x)
    if "shift" in draws:
        x = apply_shift(x, draws["shift"])
    return apply_shear(x, draws["shear"]) if "shear" in draws else x


def to_view(x: torch.Tensor, view: str, layout: str | dict | Layout = "ntu-rgb+d") -> torch.Tensor:
    """The input stream: ``joint`` (identity), ``motion`` (frame differences, last frame 0) or ``bone``
    (joint minus its parent; the root's bone is 0). Every channel is treated alike, a score channel too."""
    _check_batch(x)
    if view == "joint":
        return x
    if view == "motion":
        return torch.cat([x[:, :, 1:] - x[:, :, :-1], torch.zeros_like(x[:, :, :1])], dim=2)
    if view == "bone":
        layout = get_layout(layout)
        if x.shape[3] != layout.num_joints:
            raise ValueError(f"bone view of layout {layout.name!r} needs V={layout.num_joints}; got {x.shape[3]}")
        parents = tuple(layout.parents())
        # While tracing (torch.compile, torch.export) the index is a constant of the graph; a cached tensor made
        # there would be a fake one, left in the cache for later eager calls.
        index = list(parents) if torch.compiler.is_compiling() else _parents(parents, x.device)
        return x - x[:, :, :, index]
    raise ValueError(f"view must be one of {', '.join(VIEWS)}; got {view!r}")


@lru_cache(maxsize=None)
def _parents(parents: tuple, device: torch.device) -> torch.Tensor:
    """``parents`` as an index tensor kept on ``device``: indexing with a Python list would copy it from the
    host on every call (not allowed while a CUDA graph is captured)."""
    return torch.tensor(parents, dtype=torch.long, device=device)
