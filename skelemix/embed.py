"""``python -m skelemix.embed``: the features of a trained encoder, for a prepared split, raw files or a PYSKL pickle.

::

    python -m skelemix.embed --checkpoint CKPT --data DATA_DIR [--split val] --out DIR [--plot tsne|pca]
    python -m skelemix.embed --checkpoint CKPT --raw FILE_OR_DIR [FILE_OR_DIR ...] --out DIR
    python -m skelemix.embed --checkpoint CKPT --pyskl ANNOTATIONS.pkl [--split xsub_val] --out DIR

``--checkpoint`` takes what ``python -m skelemix.evaluate`` takes (a checkpoint of ``python -m skelemix.train``, a
classifier of ``evaluate``, an official SkeleMixCLR state dict with ``--config``/``--set`` for its architecture).
Raw files (NTU ``.skeleton``, NW-UCLA ``.json``; folders are searched for them) and PYSKL annotations are
prepared as the encoder's training data was: the checkpoint records the converter's settings (frame count,
bodies, preprocessing), and the converters' own per-file functions apply them. Prepared data is used as it is.

Writes to ``--out``: ``features.npy`` (float32 ``(N, D)``, the pooled encoder output that linear evaluation sees,
after the input view the encoder was trained on), ``names.txt`` (N sample names), ``labels.npy`` (int64, when
every input's label is known: prepared data, PYSKL annotations, raw files named as in their dataset),
``embed.json`` (what was embedded and how) and, with ``--plot``, ``embedding.png`` (t-SNE needs scikit-learn;
PCA needs nothing). Inputs are read and encoded in batches and the features go straight into a memory-mapped
file, so memory stays flat however many samples there are.

In Python, :func:`load_encoder` gives the encoder as an ``nn.Module``: prepared sequences ``(N, C, T, V, M)`` in,
features ``(N, D)`` out.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm import tqdm

from . import cli, ops
from .embed_sources import Source, prepared_source, pyskl_source, raw_source
from .trained_encoder import Encoder, load_encoder  # documented as skelemix.embed.Encoder / .load_encoder too

PLOT_POINTS = 5000  # samples drawn in embedding.png (a random subset of larger inputs: t-SNE is quadratic)


# ----------------------------------------------------------------------------------------------- embed
def embed(encoder: Encoder, source: Source, out: str | os.PathLike, batch_size: int = 256, device="cpu",
          progress: bool = True) -> dict:
    """Encode every sample of ``source`` into ``out/features.npy`` (a memory map), ``names.txt`` and, where
    every label is known, ``labels.npy``. Returns the summary written to ``embed.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "features.npy.tmp"
    features = open_memmap(tmp, "w+", np.float32, (source.size, encoder.feature_dim))
    names, labels, left_out = [], [], []
    bar = tqdm(total=source.size, desc="embedding", unit="sample", disable=not progress, dynamic_ncols=True)
    done = False
    try:
        with torch.no_grad():
            for batch in source.batches(batch_size):
                kept = [(n, y, x) for n, y, x in batch if x is not None]
                left_out += [n for n, _, x in batch if x is None]
                if kept:
                    x = torch.from_numpy(np.stack([x for _, _, x in kept])).to(device)
                    features[len(names):len(names) + len(kept)] = encoder(x).float().cpu().numpy()
                    names += [n for n, _, _ in kept]
                    labels += [y for _, y, _ in kept]
                bar.update(len(batch))
        features.flush()
        del features
        if len(names) < source.size:  # inputs without any body were left out: keep only the rows written
            _shrink(tmp, len(names))
        os.replace(tmp, out / "features.npy")
        done = True
    finally:
        bar.leave = done  # an error clears the bar: its one line is the message
        bar.close()
        Path(tmp).unlink(missing_ok=True)
    (out / "names.txt").write_text("".join(f"{n}\n" for n in names))
    files = ["features.npy", "names.txt"]
    known = bool(labels) and all(y is not None for y in labels)
    if known:
        np.save(out / "labels.npy", np.asarray(labels, np.int64))
        files.append("labels.npy")
    else:
        (out / "labels.npy").unlink(missing_ok=True)
    return {"checkpoint": getattr(encoder, "path", None), "input": source.description, "samples": len(names),
            "feature_dim": encoder.feature_dim, "layout": encoder.layout.name, "channels": encoder.channels,
            "view": encoder.view, "labels": known, "left_out_no_body": left_out, "preparation": source.preparation,
            "files": files}


def _shrink(path: Path, rows: int, chunk: int = 4096) -> None:
    """Keep the first ``rows`` rows of the ``.npy`` file at ``path`` (copied in chunks: flat memory)."""
    old = np.load(path, mmap_mode="r")
    small = path.with_name(path.name + ".small")
    new = open_memmap(small, "w+", np.float32, (rows,) + old.shape[1:])
    for start in range(0, rows, chunk):
        new[start:start + chunk] = old[start:min(start + chunk, rows)]
    new.flush()
    del new, old
    os.replace(small, path)


def plot(out: str | os.PathLike, method: str, classes: list[str] | None, title: str) -> Path:
    """``out/embedding.png``: a 2-D ``method`` ("tsne" or "pca") map of at most :data:`PLOT_POINTS` of the features
    in ``out``, coloured by class where the labels are known."""
    from .plots import plot_embedding

    out = Path(out)
    features = np.load(out / "features.npy", mmap_mode="r")
    labels = np.load(out / "labels.npy") if (out / "labels.npy").is_file() else np.zeros(len(features), np.int64)
    classes = classes if (out / "labels.npy").is_file() and classes else ["unlabelled"]
    pick = np.arange(len(features))
    if len(pick) > PLOT_POINTS:
        pick = np.sort(np.random.default_rng(0).choice(len(pick), PLOT_POINTS, replace=False))
        title += f" ({PLOT_POINTS} of {len(features)} samples)"
    return plot_embedding(np.asarray(features[pick]), labels[pick], classes, out / "embedding.png", title=title,
                          method=method)


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m skelemix.embed", description=__doc__.splitlines()[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint of `python -m skelemix.train` or `evaluate`, or "
                                                       "an official SkeleMixCLR state dict")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="a prepared dataset folder (with meta.json)")
    what.add_argument("--raw", nargs="+", help="NTU .skeleton or NW-UCLA .json files, or folders of them")
    what.add_argument("--pyskl", help="a PYSKL annotation .pkl")
    p.add_argument("--split", default=None, help="--data: the split (default val); --pyskl: a split of the file "
                                                 "(default: every annotation)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--plot", choices=("tsne", "pca"), default=None,
                   help="also draw embedding.png (t-SNE needs scikit-learn: pip install scikit-learn)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=1, help="--raw: processes parsing the files (default 1)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--impl", default=None, choices=ops.IMPLS, help="op implementation (default: the checkpoint's)")
    p.add_argument("--config", default=None, help="architecture config (YAML) for official checkpoints")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for official checkpoints, e.g. --set model.hidden_channels=64")
    p.add_argument("--no-progress", action="store_true")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 1:
        p.error("--batch-size and --workers must be >= 1")
    return args


def _require_tsne() -> None:
    try:
        import sklearn.manifold  # noqa: F401
    except ImportError:
        raise ValueError("--plot tsne needs scikit-learn (pip install scikit-learn, or pip install -e .[embed]); "
                         "--plot pca needs nothing") from None


def run(args) -> dict:
    from .config import resolve_device

    if args.plot == "tsne":
        _require_tsne()  # before the features are computed, not after
    device = resolve_device(args.device)
    encoder = load_encoder(args.checkpoint, device, impl=args.impl or "auto", config=args.config,
                           overrides=args.set)
    if args.data is not None:
        source = prepared_source(encoder, args.data, args.split or "val")
    elif args.raw is not None:
        source = raw_source(encoder, args.raw, args.workers)
    else:
        source = pyskl_source(encoder, args.pyskl, args.split)
    if args.data is None and encoder.recipe is None:
        print(f"note: {encoder.path or 'the encoder'} does not record how its training data was prepared (generated "
              f"data, or an official checkpoint): the converter's defaults are used, at {encoder.frames} frames",
              flush=True)
    print(f"embedding {source.description} with {encoder.path or 'a randomly initialised encoder'} "
          f"({encoder.layout.name}, {encoder.channels}, {encoder.view} view, {encoder.feature_dim}-d) on {device}",
          flush=True)
    summary = embed(encoder, source, args.out, args.batch_size, device, progress=not args.no_progress)
    if args.plot:
        method = {"tsne": "t-SNE", "pca": "PCA"}[args.plot]
        plot(args.out, args.plot, source.classes, f"{source.description}: {encoder.view} features, 2-D {method}")
        summary["files"].append("embedding.png")
    out = Path(args.out)
    summary["files"].append("embed.json")
    (out / "embed.json").write_text(json.dumps(summary, indent=2) + "\n")
    if summary["left_out_no_body"]:
        n = len(summary["left_out_no_body"])
        print(f"note: {n} input(s) without a body in any frame were left out: "
              f"{', '.join(summary['left_out_no_body'][:5])}{' ...' if n > 5 else ''}")
    print(f"wrote {summary['samples']} x {summary['feature_dim']} features: {', '.join(summary['files'])} in {out}",
          flush=True)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
