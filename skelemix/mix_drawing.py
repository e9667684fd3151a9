"""SkeleMix drawn: one sequence, its partner and their mix (docs/DESIGN.md 3), as a PNG grid and an animated GIF.

:func:`mix_example` mixes a pair with the released settings; :func:`render_mix` and :func:`animate_mix` draw it,
the pasted fragment in red where it comes from and where it lands. ``python -m skelemix.viz mix`` is the command.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .graph import NTU, Layout
from .plots import PLAIN, figure, save_figure

# Colours of the SkeleMix regions, shared by the grid and the animation (joints outside the window are PLAIN).
PASTED = "#d62728"  # joints of the pasted fragment (from the partner: the "trimmed" view)
KEPT = "#1f77b4"  # joints the sample keeps (the "truncated" view)
REPLACED = "#c8c8c8"  # the sample's own joints that the fragment replaces; the partner's joints not taken
WINDOW = "#fff3c4"  # background of frames inside the region's time window


def scaled_tem_range(frames: int, block: int = 4, released=(7, 11), released_frames: int = 64) -> tuple[int, int]:
    """The released temporal range (7-11 blocks of 4 frames out of 64) scaled to ``frames`` frames."""
    blocks = frames // block
    if blocks < 1:
        raise ValueError(f"a sequence of {frames} frames has no whole block of {block} frames to mix")
    scale = blocks / (released_frames // block)
    lo = min(blocks, max(1, round(released[0] * scale)))
    hi = min(blocks, max(lo, round(released[1] * scale)))
    return lo, hi


def mix_example(x: torch.Tensor, partner_x: torch.Tensor, seed: int = 0, layout: Layout = NTU,
                spa_range=(2, 3), tem_range=None, block: int = 4) -> dict:
    """SkeleMix one sequence with a partner (both ``(C, T, V, M)``), with the released settings.

    The region is drawn by :class:`~skelemix.mix.SkeleMix` (``tem_range`` defaults to the released 7-11 blocks
    scaled to ``T``), the pasting is :func:`skelemix.reference.skelemix_gather`. Returns ``mixed (C, T, V, M)``,
    ``joints`` (bool ``(V,)``, the pasted joints), ``window`` (first frame, end frame) and ``parts`` (names).
    """
    from .mix import SkeleMix
    from .reference import skelemix_gather

    T = x.shape[1]
    if T % block:
        raise ValueError(f"T={T} must be a multiple of the temporal block {block}")
    tem_range = tem_range or scaled_tem_range(T, block)
    mixer = SkeleMix(layout.body_parts, layout.num_joints, spa_range=spa_range, tem_range=tem_range, block=block,
                     impl="eager")
    g = torch.Generator().manual_seed(seed)
    batch = torch.stack([x, partner_x]).float()
    partner = mixer.sample_partner(2, g)  # of a pair: each is the other's partner
    joints, span = mixer.sample_region(1, T // block, g)  # (1, V), (1, 2) in blocks
    mixed = skelemix_gather(batch, partner[None], joints[None], span[None], block)[0][0]
    start, end = span[0].tolist()
    joints = joints[0]
    parts = [name for name, part in zip(layout.part_names, layout.body_parts) if joints[list(part)].all()]
    return {"mixed": mixed, "joints": joints.numpy(), "window": (start * block, end * block),
            "parts": parts, "tem_range": tuple(tem_range)}


def _bodies(seq: np.ndarray, t: int):
    """Bodies present at frame ``t`` of ``seq (C, T, V, M)``: list of ``(V, 2)`` x-y arrays."""
    out = []
    for m in range(seq.shape[3]):
        xy = seq[:2, t, :, m].T
        if np.abs(seq[:, t, :, m]).sum() > 0:
            out.append((m, xy))
    return out


def _region_colors(row: str, joints: np.ndarray, active: bool) -> list[str]:
    """Joint colours of a row inside the time window: the partner's fragment is red where it comes from (the
    partner row) and where it lands (the mixed row); what the sample keeps is blue; the sample's joints that
    get replaced are faded. Outside the window every row is plain grey."""
    if not active:
        return [PLAIN] * len(joints)
    inside, outside = {"sample": (REPLACED, KEPT), "partner": (PASTED, REPLACED), "mixed": (PASTED, KEPT)}[row]
    return [inside if j else outside for j in joints]


def _draw_skeleton(ax, seq: np.ndarray, t: int, layout: Layout, colors: Sequence[str], marker_size: float = 9):
    """Bones and joints of every body present at frame ``t``, joint ``v`` in ``colors[v]``; a bone takes the
    colour its two joints share, grey otherwise."""
    for _, xy in _bodies(seq, t):
        for child, parent in layout.bones:
            color = colors[child] if colors[child] == colors[parent] else PLAIN
            ax.plot(*xy[[child, parent]].T, color=color, lw=1.2, alpha=0.9)
        ax.scatter(xy[:, 0], xy[:, 1], s=marker_size, c=list(colors), zorder=3, linewidths=0)


def _limits(seqs):
    xy = np.concatenate([s[:2].reshape(2, -1) for s in seqs], axis=1)
    nonzero = np.abs(xy).sum(0) > 0
    xy = xy[:, nonzero] if nonzero.any() else xy
    lo, hi = xy.min(1), xy.max(1)
    centre, half = (lo + hi) / 2, max((hi - lo).max() / 2, 1e-3) * 1.08
    return (centre[0] - half, centre[0] + half), (centre[1] - half, centre[1] + half)


def render_mix(x: np.ndarray, partner_x: np.ndarray, mixed: np.ndarray, joints: np.ndarray, window: tuple[int, int],
               path: str | Path, columns: int = 8, layout: Layout = NTU, title: str = "") -> Path:
    """The PNG grid: rows sample / partner / mixed, ``columns`` evenly spaced frames. Inside the region's time
    window (yellow background) the pasted joints are red (where they come from in the partner row, where they
    land in the mixed row), the kept ones blue, and the replaced / unused ones faded."""
    T = x.shape[1]
    frames = np.unique(np.linspace(0, T - 1, min(columns, T)).round().astype(int))
    xlim, ylim = _limits([x, partner_x, mixed])
    fig = figure(1.7 * len(frames) + 0.8, 6.2)
    rows = (("sample", x), ("partner", partner_x), ("mixed", mixed))
    for r, (name, seq) in enumerate(rows):
        for c, t in enumerate(frames):
            ax = fig.add_subplot(3, len(frames), r * len(frames) + c + 1)
            active = window[0] <= t < window[1]
            if active:
                ax.set_facecolor(WINDOW)
            _draw_skeleton(ax, seq, t, layout, _region_colors(name, joints, active))
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t={t}" + (" (mixed)" if active else ""), fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=10)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], marker="o", ls="", color=PASTED, label="pasted (trimmed region, from the partner)"),
               Line2D([], [], marker="o", ls="", color=KEPT, label="kept (truncated region, the sample's own)"),
               Line2D([], [], marker="o", ls="", color=REPLACED, label="replaced / not taken"),
               Patch(color=WINDOW, label=f"region's time window: frames {window[0]}-{window[1] - 1}")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97 if title else 1))
    return save_figure(fig, path, dpi=90)


def animate_mix(x: np.ndarray, partner_x: np.ndarray, mixed: np.ndarray, joints: np.ndarray, window: tuple[int, int],
                path: str | Path, layout: Layout = NTU, fps: int = 12, step: int = 1) -> Path:
    """An animated GIF of sample, partner and mixed side by side (``matplotlib.animation.PillowWriter``)."""
    from matplotlib.animation import FuncAnimation, PillowWriter

    T = x.shape[1]
    xlim, ylim = _limits([x, partner_x, mixed])
    fig = figure(9, 3.3)
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.03, top=0.84, wspace=0.06)
    names = ("sample", "partner", "mixed")

    def draw(t):
        active = window[0] <= t < window[1]
        for ax, name, seq in zip(axes, names, (x, partner_x, mixed)):
            ax.clear()
            ax.set_facecolor(WINDOW if active else "white")
            _draw_skeleton(ax, seq, t, layout, _region_colors(name, joints, active), marker_size=14)
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name, fontsize=10)
        fig.suptitle(f"frame {t + 1}/{T}" + ("  -  pasting the partner's fragment (red)" if active else ""),
                     fontsize=9)
        return []

    frames = list(range(0, T, max(1, step)))
    anim = FuncAnimation(fig, draw, frames=frames, blit=False, repeat=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    anim.save(path, writer=PillowWriter(fps=fps), dpi=70)
    return path
