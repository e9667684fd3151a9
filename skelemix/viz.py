"""Pictures: training curves, confusion matrices, feature embeddings, and ``python -m skelemix.viz mix``.

``python -m skelemix.viz mix`` renders one sequence, its partner and their SkeleMix result (docs/DESIGN.md 3)
as a PNG grid and an animated GIF; ``python -m skelemix.viz curves RUN/metrics.jsonl`` redraws a run's
training curves. Everything is drawn with matplotlib's object API on the Agg canvas: nothing touches the
global pyplot state or needs a display, so the helpers are safe to call from the trainer and from tests.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import cli
from .graph import NTU, Layout, get_layout
from .metrics import read_metrics  # noqa: F401 (re-exported: skelemix.viz.read_metrics)

# Colours of the SkeleMix regions, shared by the grid and the animation.
PASTED = "#d62728"  # joints of the pasted fragment (from the partner: the "trimmed" view)
KEPT = "#1f77b4"  # joints the sample keeps (the "truncated" view)
PLAIN = "#555555"
REPLACED = "#c8c8c8"  # the sample's own joints that the fragment replaces; the partner's joints not taken
WINDOW = "#fff3c4"  # background of frames inside the region's time window
SYNTHETIC_SAMPLES = 32  # generated sequences `viz mix --data synthetic` picks from


def _figure(width: float, height: float):
    """A figure on the Agg canvas, independent of pyplot and of the user's matplotlib backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


# ---------------------------------------------------------------------------------------------- curves
def _series(records: list[dict], key: str) -> tuple[list, list]:
    """(epochs, values) of ``key``, dropping missing and non-finite values (e.g. loss_p of a no-mix run)."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["epoch"])
            ys.append(v)
    return xs, ys


def plot_curves(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Draw ``loss.png`` (total loss and its parts, and the learning rate, per epoch) and, when the run has kNN
    records, ``knn.png`` (kNN top-1 per k) from a trainer's ``metrics.jsonl`` into ``out_dir``.

    Only records of kind ``"epoch"`` and ``"knn"`` are read; other kinds are ignored. Returns the written paths.
    """
    records = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    written = []
    epochs = sorted((r for r in records if r.get("kind") == "epoch" and "epoch" in r), key=lambda r: r["epoch"])
    if epochs:
        has_lr = bool(_series(epochs, "lr")[0])
        fig = _figure(7, 6 if has_lr else 4)
        ax = fig.add_subplot(2 if has_lr else 1, 1, 1)
        for key, label, style in (("loss", "total", "-"), ("loss_ins", "instance", "--"),
                                  ("loss_p", "trimmed (p)", "--"), ("loss_c", "truncated (c)", "--")):
            xs, ys = _series(epochs, key)
            if xs:
                ax.plot(xs, ys, style, marker="o" if len(xs) < 30 else None, ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title("pretraining loss")
        ax.grid(alpha=0.3)
        ax.legend()
        if has_lr:
            ax2 = fig.add_subplot(2, 1, 2)
            xs, ys = _series(epochs, "lr")
            ax2.plot(xs, ys, color=PLAIN)
            if min(ys) > 0 and max(ys) / min(ys) > 20:
                ax2.set_yscale("log")
            ax2.set_xlabel("epoch")
            ax2.set_ylabel("learning rate")
            ax2.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "loss.png"))
    knn = sorted((r for r in records if r.get("kind") == "knn" and "epoch" in r), key=lambda r: r["epoch"])
    keys = sorted({k for r in knn for k in r if k.startswith("knn@")}, key=lambda k: int(k[4:]) if k[4:].isdigit()
                  else 0)
    if knn and keys:
        fig = _figure(7, 4)
        ax = fig.add_subplot(1, 1, 1)
        for key in keys:
            xs, ys = _series(knn, key)
            ax.plot(xs, ys, marker="o", ms=3, label=f"k = {key[4:]}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("kNN top-1 (%)")
        ax.set_title("kNN monitor (weighted, t = 0.1)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out_dir / "knn.png"))
    return written


# --------------------------------------------------------------------------------- evaluation pictures
def plot_confusion(confusion: np.ndarray, classes: Sequence[str], path: str | Path, title: str | None = None) -> Path:
    """A confusion matrix (rows: true class, columns: predicted), coloured by the row-normalised rate so that
    classes of different sizes compare; counts are written in the cells when there are few classes."""
    confusion = np.asarray(confusion)
    C = confusion.shape[0]
    if confusion.shape != (C, C) or len(classes) != C:
        raise ValueError(f"confusion must be (C, C) with C = len(classes) = {len(classes)}; got {confusion.shape}")
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    size = min(max(5.0, 0.28 * C + 2.5), 40.0)
    font = 8 if C <= 20 else max(3, 8 - C // 20)
    fig = _figure(size, size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(C))
    ax.set_yticks(range(C))
    ax.set_xticklabels(classes, rotation=90, fontsize=font)
    ax.set_yticklabels(classes, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = 100.0 * np.trace(confusion) / max(confusion.sum(), 1)
    ax.set_title(title or f"confusion matrix (top-1 {acc:.1f}%, {int(confusion.sum())} samples)")
    if C <= 20:
        for i in range(C):
            for j in range(C):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=font - 1,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    return _save(fig, path)


def pca_2d(features) -> np.ndarray:
    """The first two principal components of ``features (N, D)`` (centred SVD, no sklearn)."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    proj = x @ vh[:2].T
    if proj.shape[1] < 2:  # a single feature dimension: pad so the plot still works
        proj = torch.cat([proj, torch.zeros(len(proj), 2 - proj.shape[1], dtype=proj.dtype)], 1)
    return proj.numpy()


def tsne_2d(features, seed: int = 0) -> np.ndarray:
    """A 2-D t-SNE map of ``features (N, D)`` (scikit-learn, an optional dependency: ``pip install scikit-learn``)."""
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float32)
    perplexity = float(min(30.0, max(1.0, (len(x) - 1) / 3)))  # it must stay below the sample count
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def plot_embedding(features, labels, classes: Sequence[str], path: str | Path, title: str | None = None,
                   method: str = "pca") -> Path:
    """A 2-D scatter of ``features (N, D)`` coloured by class (legend for up to 20 classes): ``method`` "pca" (no
    dependency) or "tsne" (:func:`tsne_2d`)."""
    labels = np.asarray(labels)
    if method not in ("pca", "tsne"):
        raise ValueError(f"method must be 'pca' or 'tsne'; got {method!r}")
    xy = pca_2d(features) if method == "pca" else tsne_2d(features)
    C = len(classes)
    from matplotlib import colormaps

    cmap = colormaps["tab10" if C <= 10 else "tab20" if C <= 20 else "turbo"]
    fig = _figure(7.5 if C <= 20 else 6.5, 6)
    ax = fig.add_subplot(1, 1, 1)
    size = max(4.0, min(30.0, 3000 / max(len(labels), 1)))  # big dots for few samples, small for many
    for c in range(C):
        sel = labels == c
        if sel.any():
            color = cmap(c if C <= 20 else c / max(C - 1, 1))
            ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=color, alpha=0.8, label=classes[c], linewidths=0)
    axis = "PC" if method == "pca" else "t-SNE"
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(f"{axis} 2")
    ax.set_title(title or f"features of {len(labels)} samples, 2-D {'PCA' if method == 'pca' else 't-SNE'}")
    ax.grid(alpha=0.3)
    if C <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- mixing
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
    fig = _figure(1.7 * len(frames) + 0.8, 6.2)
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
    return _save(fig, path, dpi=90)


def animate_mix(x: np.ndarray, partner_x: np.ndarray, mixed: np.ndarray, joints: np.ndarray, window: tuple[int, int],
                path: str | Path, layout: Layout = NTU, fps: int = 12, step: int = 1) -> Path:
    """An animated GIF of sample, partner and mixed side by side (``matplotlib.animation.PillowWriter``)."""
    from matplotlib.animation import FuncAnimation, PillowWriter

    T = x.shape[1]
    xlim, ylim = _limits([x, partner_x, mixed])
    fig = _figure(9, 3.3)
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


# ------------------------------------------------------------------------------------------------- CLI
def _load_sequences(args) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """Two sequences ``(C, T, V, M)`` (index and partner), their class names and a description with the data's
    ``layout`` and ``channels``."""
    if args.data == "synthetic":
        from .data.synthetic import CLASSES, make_synthetic

        data, labels = make_synthetic(SYNTHETIC_SAMPLES, frames=args.length, seed=args.seed)
        classes, source = list(CLASSES), f"synthetic data (seed {args.seed}, {args.length} frames)"
        pick = lambda i: (data[i], int(labels[i]))  # noqa: E731
        size, layout, channels = SYNTHETIC_SAMPLES, NTU, "x,y,z"
    else:
        from .data import PreparedDataset
        from .data.prepared import channels_of

        root = Path(args.data)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder not found: {root}; pass a prepared dataset folder (see "
                                    "`python -m skelemix.data`) or 'synthetic'")
        ds = PreparedDataset(root, args.split)
        classes, source = list(ds.meta["classes"]), f"{root} ({args.split})"
        pick = lambda i: (np.array(ds.data[ds.indices[i]], dtype=np.float32), int(ds.targets[i]))  # noqa: E731
        size, layout, channels = len(ds), get_layout(ds.meta["layout"]), channels_of(ds.meta, root / "meta.json")
    if not 0 <= args.index < size:
        raise ValueError(f"--index {args.index} is outside the {size} samples of {source}")
    if args.partner is None:
        rng = np.random.default_rng(args.seed)
        partner = int(rng.integers(0, size - 1))
        partner += partner >= args.index  # anything but the sample itself
    else:
        partner = args.partner
        if not 0 <= partner < size or partner == args.index:
            raise ValueError(f"--partner {partner} must be another sample in [0, {size})")
    (x, yx), (p, yp) = pick(args.index), pick(partner)
    return x, p, [classes[yx], classes[yp]], {"source": source, "partner": partner, "layout": layout,
                                               "channels": channels}


def _mix_command(args) -> int:
    x, p, names, info = _load_sequences(args)
    T = x.shape[1] - x.shape[1] % 4  # whole blocks of the encoder's temporal stride
    x, p = x[:, :T], p[:, :T]
    layout = info["layout"]
    ex = mix_example(torch.from_numpy(x), torch.from_numpy(p), seed=args.seed, layout=layout)
    mixed = ex["mixed"].numpy()
    if info["channels"] != "x,y,z":  # image coordinates: y grows downward, so draw -y
        flip = np.ones((x.shape[0], 1, 1, 1), np.float32)
        flip[1] = -1
        x, p, mixed = x * flip, p * flip, mixed * flip
    out = Path(args.out)
    title = (f"SkeleMix ({layout.name}): sample {args.index} ({names[0]}) + partner {info['partner']} ({names[1]}); "
             f"pasted parts {', '.join(ex['parts'])}; frames {ex['window'][0]}-{ex['window'][1] - 1} of {T}")
    png = render_mix(x, p, mixed, ex["joints"], ex["window"], out / "mix.png", columns=args.frames, layout=layout,
                     title=title)
    gif = animate_mix(x, p, mixed, ex["joints"], ex["window"], out / "mix.gif", layout=layout, step=args.step)
    print(title)
    print(f"data: {info['source']}; temporal range {ex['tem_range']} blocks of 4 frames; wrote {png} and {gif}")
    return 0


def _curves_command(args) -> int:
    out = Path(args.out) if args.out else Path(args.metrics).parent
    written = plot_curves(args.metrics, out)
    print("wrote " + (", ".join(map(str, written)) if written else "nothing (no epoch or knn records)"))
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m skelemix.viz", description=__doc__.splitlines()[0].replace("``", ""))
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mix", help="render a sequence, its partner and their SkeleMix result (PNG grid + GIF)")
    m.add_argument("--data", default="synthetic", help="prepared dataset folder, or 'synthetic' (default)")
    m.add_argument("--split", default="train", help="split of a prepared dataset (default train)")
    m.add_argument("--index", type=int, default=0, help="the sample (default 0)")
    m.add_argument("--partner", type=int, default=None, help="the partner sample (default: drawn from --seed)")
    m.add_argument("--seed", type=int, default=0, help="seed of the partner, the region and synthetic data")
    m.add_argument("--out", default="runs/viz", help="output folder (default runs/viz)")
    m.add_argument("--frames", type=int, default=8, help="frames (columns) in the PNG grid (default 8)")
    m.add_argument("--length", type=int, default=64, help="frames of a synthetic sequence (default 64)")
    m.add_argument("--step", type=int, default=1, help="draw every STEP-th frame in the GIF (default 1)")
    c = sub.add_parser("curves", help="draw loss.png and knn.png from a trainer's metrics.jsonl")
    c.add_argument("metrics", help="path to metrics.jsonl")
    c.add_argument("--out", default=None, help="output folder (default: the folder of metrics.jsonl)")
    cli.add_debug_flag(p)
    return p.parse_args(argv)


def _command(args) -> int:
    if args.command == "curves":
        return _curves_command(args)
    if args.frames < 1 or args.length < 4 or args.step < 1:
        raise ValueError("--frames and --step must be >= 1 and --length >= 4")
    return _mix_command(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: _command(args), debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
