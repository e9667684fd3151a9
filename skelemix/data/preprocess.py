"""Fixed-length preprocessing of raw skeleton sequences (docs/DESIGN.md 1.3): centre each body on a root joint,
resize the time axis linearly, rotate every frame about the y axis so the shoulders lie along +x.

``official=True`` reproduces ``feeder/preprocess_ntu.py`` bit for bit in its quirks:

* the sequence length is the *number* of frames in which body 0's first joint is nonzero (frames of body 1
  only, or gaps of body 0, shorten the window and cut off the end of the action);
* the rotation angle is ``arccos(v.x / (|v| + 1e-4))`` with one sign for the whole sequence (from the sum of
  ``v.z``): frames whose shoulder vector points the other way are rotated away from +x, and every frame
  keeps a residual z of about 1e-3 from the epsilon.

The default (``official=False``) uses the frames from the first to the last in which any body is present,
and per-frame ``atan2`` angles, which put every frame's shoulder vector exactly on +x.

``centre="first"`` keeps the global motion instead (the NW-UCLA loaders of the literature, e.g. CTR-GCN's): every
frame of a body is moved by that body's origin in the first kept frame and rotated by that frame's angle, so a
walker's path stays in the data; the default ``"frame"`` centres and rotates each frame on its own.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def resize_time(x: np.ndarray, frames: int) -> np.ndarray:
    """Linear resize of axis 1 of ``(C, T, ...)`` to ``frames`` (half-pixel centres, edge clamping: the
    same as cv2.resize INTER_LINEAR and ``F.interpolate(mode='linear', align_corners=False)``)."""
    T = x.shape[1]
    if T == frames:
        return x.copy()
    src = (np.arange(frames, dtype=np.float64) + 0.5) * (T / frames) - 0.5
    src = np.clip(src, 0, T - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, T - 1)
    w = (src - lo).reshape((1, frames) + (1,) * (x.ndim - 2))
    return x[:, lo] * (1 - w) + x[:, hi] * w


def valid_window(x: np.ndarray, official: bool = False) -> tuple[int, int]:
    """The ``[start, stop)`` frames of ``x (C, T, V, M)`` that are kept (see the module doc)."""
    if official:
        return 0, int((np.abs(x[:, :, 0, 0]).sum(axis=0) != 0).sum())
    present = np.flatnonzero(np.abs(x).sum(axis=(0, 2, 3)) != 0)
    if len(present) == 0:
        return 0, 0
    return int(present[0]), int(present[-1]) + 1


def has_body(x: np.ndarray, official: bool = False) -> bool:
    """Whether :func:`preprocess` keeps any frame of ``x``: converters list a sample without one as missing
    skeletons (with ``official``, body 0's first joint must be nonzero in some frame)."""
    start, stop = valid_window(x, official)
    return stop > start


def align_shoulders(x: np.ndarray, left: int = 4, right: int = 8, official: bool = False,
                    first_frame: bool = False) -> np.ndarray:
    """Rotate ``x (3, T, V, M)`` about y, per frame and body, so the shoulder vector ``right - left`` lies on
    +x (float64 arithmetic); with ``first_frame``, every frame of a body by the angle of its first frame."""
    x = x.astype(np.float64)
    out = np.empty_like(x)
    for m in range(x.shape[3]):
        v = x[:, :, right, m] - x[:, :, left, m]  # (3, T)
        if first_frame:
            v = np.repeat(v[:, :1], v.shape[1], axis=1)
        vx, vz = v[0], v[2]
        if official:
            theta = np.arccos(vx / (np.sqrt(vx ** 2 + vz ** 2) + 1e-4))
            if vz.sum() >= 0:
                theta = -theta
        else:
            theta = -np.arctan2(vz, vx)  # 0 for an absent body (v = 0)
        c, s = np.cos(theta), np.sin(theta)
        X, Y, Z = x[0, :, :, m], x[1, :, :, m], x[2, :, :, m]
        out[0, :, :, m] = c[:, None] * X - s[:, None] * Z
        out[1, :, :, m] = Y
        out[2, :, :, m] = s[:, None] * X + c[:, None] * Z
    return out


CENTRES = ("frame", "first")


def preprocess(x: np.ndarray, frames: int = 64, center: int | Sequence[int] = 20,
               shoulders: Sequence[int] | None = (4, 8), official: bool = False, mode: str = "full",
               coords: int = 3, centre: str = "frame") -> np.ndarray:
    """``x (C, T, V, M)`` raw sequence (absent bodies zero) -> float32 ``(C, frames, V, M)``. The first
    ``coords`` channels are coordinates (x, y, z or x, y); a further channel (a detection score) is only resized.

    ``mode="full"``: centre the coordinates on joint ``center`` (or the mean of several joints) per frame and
    body, resize, and for 3-D data rotate the ``shoulders = (left, right)`` line onto +x (None: no rotation;
    2-D data is never rotated). ``mode="resize"``: only the temporal resize of the whole sequence.
    ``center=20, shoulders=(4, 8)`` are NTU's spine shoulder and shoulders (the ``origin`` and ``x_axis`` of a
    layout file); NW-UCLA uses ``center=2``. ``centre``: ``"frame"`` (each frame on its own origin and angle)
    or ``"first"`` (the first kept frame's, for every frame: the module doc).
    """
    x = np.asarray(x, dtype=np.float32)
    if coords not in (2, 3) or x.ndim != 4 or not coords <= x.shape[0] <= 3:
        expected = "(3, T, V, M) sequence" if coords == 3 else "(2 or 3, T, V, M) sequence (x, y and maybe a score)"
        raise ValueError(f"expected a {expected}; got shape {x.shape}")
    if mode == "resize":
        return resize_time(x, frames).astype(np.float32)
    if mode != "full":
        raise ValueError(f"mode must be 'full' or 'resize'; got {mode!r}")
    if centre not in CENTRES:
        raise ValueError(f"centre must be one of {', '.join(CENTRES)}; got {centre!r}")
    start, stop = valid_window(x, official)
    if stop <= start:
        raise ValueError("no frame with a body present: nothing to preprocess")
    x = x[:, start:stop].copy()
    origin = [center] if isinstance(center, (int, np.integer)) else list(center)
    # Absent bodies (all zero) stay zero. One joint is subtracted as it is (bit for bit the official centring).
    root = x[:coords, :, origin[0]:origin[0] + 1] if len(origin) == 1 else x[:coords, :, origin].mean(axis=2,
                                                                                                     keepdims=True)
    if centre == "first":  # each body's origin in its first present frame, for its present frames only
        present = np.abs(x).sum(axis=(0, 2), keepdims=True) != 0  # (1, T, 1, M)
        first = present[0, :, 0, :].argmax(axis=0)  # (M,)
        root = np.where(present, root[:, first, 0, np.arange(x.shape[3])][:, None, None, :], 0)
    x[:coords] -= root
    x = resize_time(x, frames).astype(np.float32)
    if coords == 3 and shoulders is not None:
        x = align_shoulders(x, *shoulders, official=official, first_frame=centre == "first")
    return x.astype(np.float32)
