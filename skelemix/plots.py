"""Plots of a run: training curves, confusion matrices and feature embeddings, as PNG files.

Everything is drawn with matplotlib's object API on the Agg canvas (:func:`figure`): nothing touches the global
pyplot state or needs a display, so these are safe to call from the trainer, the evaluator and tests.
``python -m skelemix.viz curves`` redraws a run's curves and ``compare`` draws several runs' on one picture;
:mod:`skelemix.mix_drawing` draws SkeleMix itself.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .metrics import read_metrics

PLAIN = "#555555"  # lines of no particular category


def figure(width: float, height: float):
    """A figure on the Agg canvas, independent of pyplot and of the user's matplotlib backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` (its folder made as needed), cropped to what is drawn."""
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
        fig = figure(7, 6 if has_lr else 4)
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
        written.append(save_figure(fig, out_dir / "loss.png"))
    knn = sorted((r for r in records if r.get("kind") == "knn" and "epoch" in r), key=lambda r: r["epoch"])
    keys = sorted({k for r in knn for k in r if k.startswith("knn@")}, key=lambda k: int(k[4:]) if k[4:].isdigit()
                  else 0)
    if knn and keys:
        fig = figure(7, 4)
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
        written.append(save_figure(fig, out_dir / "knn.png"))
    return written


def plot_compare(runs: Sequence[tuple[str, str | Path]], path: str | Path, knn_key: str = "knn@20") -> Path:
    """Several runs on one picture: total pretraining loss (left) and kNN top-1 (``knn_key``, right) per epoch.
    ``runs`` holds ``(label, metrics.jsonl)`` pairs; runs that share a label (the seeds of one variant) share a
    colour and one legend entry."""
    colours: dict[str, str] = {}
    fig = figure(11, 4)
    axes = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for label, metrics_path in runs:
        records = read_metrics(metrics_path)
        first = label not in colours
        colour = colours.setdefault(label, f"C{len(colours) % 10}")
        for ax, kind, key in ((axes[0], "epoch", "loss"), (axes[1], "knn", knn_key)):
            xs, ys = _series(sorted((r for r in records if r.get("kind") == kind and "epoch" in r),
                                    key=lambda r: r["epoch"]), key)
            ax.plot(xs, ys, color=colour, alpha=0.8, lw=1.2, label=label if first else None)
    for ax, ylabel, title in ((axes[0], "loss", "pretraining loss"),
                              (axes[1], "kNN top-1 (%)", f"kNN monitor (k = {knn_key[4:]})")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, Path(path))

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
    fig = figure(size, size)
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
    return save_figure(fig, path)


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
    fig = figure(7.5 if C <= 20 else 6.5, 6)
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
    return save_figure(fig, path)
