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
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import nn
from tqdm import tqdm

from . import cli, ops
from .augment import to_view
from .data.errors import DataFormatError, check_name
from .data.prepared import channels_of, read_rows
from .graph import Layout, get_layout

PLOT_POINTS = 5000  # samples drawn in embedding.png (a random subset of larger inputs: t-SNE is quadratic)
_RAW_KINDS = {".skeleton": "ntu", ".json": "nwucla"}


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


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class Source:
    """The samples to embed: ``size`` of them (at most), named, labelled where known, read in order."""

    description: str
    size: int
    classes: list[str] | None
    batches: Callable[[int], Iterator[list[tuple[str, int | None, np.ndarray | None]]]]  # None: no body, left out
    preparation: dict = field(default_factory=dict)  # how raw inputs were prepared (for embed.json)


def _prepared_source(encoder: Encoder, root: str, split: str) -> Source:
    from .data import PreparedDataset

    ds = PreparedDataset(root, split)
    _check_fits(encoder, get_layout(ds.meta["layout"]), channels_of(ds.meta, Path(root) / "meta.json"), root)
    names_path = Path(root) / f"{split}_names.txt"
    names = names_path.read_text().splitlines() if names_path.is_file() else [f"{split}{i:06d}" for i in
                                                                                range(len(ds))]
    if len(names) != len(ds):
        raise DataFormatError(names_path, f"{len(names)} names for the {len(ds)} samples of split {split!r}")

    def batches(size):
        for start in range(0, len(ds), size):
            stop = min(start + size, len(ds))
            data = read_rows(ds.data, start, stop)  # through the file: the split's pages do not pile up
            yield [(names[i], int(ds.labels[i]), data[i - start]) for i in range(start, stop)]

    return Source(f"{root} ({split})", len(ds), list(ds.meta["classes"]), batches,
                  {"prepared": str(root), "split": split})


def _check_fits(encoder: Encoder, layout: Layout, channels: str, source) -> None:
    want = encoder.layout
    if layout.num_joints != want.num_joints or channels != encoder.channels:
        raise ValueError(f"{source} holds {layout.name} skeletons ({layout.num_joints} joints, {channels}) but the "
                         f"encoder takes {want.name} ({want.num_joints} joints, {encoder.channels})")


def _options(encoder: Encoder, kind: str) -> dict:
    """The converter settings of the encoder's training data for a converter of ``kind`` (ntu, nwucla, pyskl);
    what the checkpoint does not record takes the converters' defaults."""
    recipe = encoder.recipe or {}
    options = dict(recipe.get("options") or {})
    frames = int(recipe.get("frames", options.get("frames", encoder.frames)))
    out = {"frames": frames, "official": bool(options.get("official", False))}
    if kind == "ntu":
        out["bodies"] = options["bodies"] if options.get("bodies") in ("tracked", "official") else "tracked"
    if kind == "pyskl":
        layout = encoder.layout
        out.update(origin=list(layout.origin), x_axis=list(layout.x_axis) if layout.x_axis else None,
                   preprocessing=options.get("preprocessing", "full"))
    return out


def _bodies(sample: np.ndarray | None, bodies: int | None) -> np.ndarray | None:
    """``sample (C, T, V, M)`` with ``bodies`` bodies, as in the training data (absent ones are zero)."""
    if sample is None or bodies is None or sample.shape[3] == bodies:
        return sample
    out = np.zeros(sample.shape[:3] + (bodies,), np.float32)
    keep = min(bodies, sample.shape[3])
    out[..., :keep] = sample[..., :keep]
    return out


_TASK = None  # (task, options) of the worker processes


def _prepare_one(task, options, key, payload) -> np.ndarray | None:
    """One input through a converter's per-file function ``task``: the prepared sample, None without a body."""
    from .data.prepare import Job

    (_, sample, _), = task(Job(str(key), [0], payload), options)
    if sample is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            sample = np.asarray(sample, np.float32)
        if not np.isfinite(sample).all():
            raise DataFormatError(key, "non-finite values in the prepared sample: a coordinate is beyond the float32 "
                                  "range of about 3.4e38")
    return sample


def _run_task(payload):
    return _prepare_one(*_TASK, payload, payload)


def _init(task, options):
    global _TASK
    _TASK = (task, options)


def _mapped(task, options, payloads, workers: int):
    """``task`` (a converter's per-file function) over ``payloads`` in order, in ``workers`` processes."""
    if workers <= 1 or len(payloads) < 2:
        _init(task, options)
        yield from map(_run_task, payloads)
        return
    pool = get_context("fork" if os.name == "posix" else "spawn").Pool(min(workers, len(payloads)), _init,
                                                                       (task, options))
    try:
        yield from pool.imap(_run_task, payloads, chunksize=4)
    finally:
        pool.terminate()
        pool.join()


def _raw_source(encoder: Encoder, paths: list[str], workers: int) -> Source:
    from .data import ntu, nwucla

    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in _RAW_KINDS)
            if not found:
                raise FileNotFoundError(f"{p}: no .skeleton (NTU) or .json (NW-UCLA) files in this folder")
            files += found
        elif p.suffix in _RAW_KINDS:
            if not p.exists():
                raise FileNotFoundError(f"raw file not found: {p}")
            files.append(p)
        else:
            raise ValueError(f"{p}: expected an NTU .skeleton file, an NW-UCLA .json file or a folder of them")
    kinds = {_RAW_KINDS[f.suffix] for f in files}
    if len(kinds) != 1:
        raise ValueError("--raw mixes NTU .skeleton and NW-UCLA .json files; embed one dataset at a time")
    kind = kinds.pop()
    module, layout = (ntu, get_layout("ntu-rgb+d")) if kind == "ntu" else (nwucla, get_layout("nw-ucla"))
    _check_fits(encoder, layout, "x,y,z", f"{files[0].parent} ({files[0].suffix} files)")
    task = ntu._ntu_task if kind == "ntu" else nwucla._task
    options = _options(encoder, kind)
    names = [check_name(f.stem, f, "sample name") for f in files]
    labels = [_raw_label(module, f) for f in files]
    bodies = (encoder.recipe or {}).get("bodies")

    def batches(size):
        samples = _mapped(task, options, [str(f) for f in files], workers)
        for start in range(0, len(files), size):
            yield [(names[i], labels[i], _bodies(next(samples), bodies)) for i in range(start, min(start + size,
                                                                                                    len(files)))]

    what = {"ntu": "NTU .skeleton", "nwucla": "NW-UCLA .json"}[kind]
    return Source(f"{len(files)} {what} files", len(files), list(module.CLASSES), batches,
                  {"raw": kind, "options": options, "bodies": bodies})


def _raw_label(module, path: Path) -> int | None:
    """The class of a raw file from its name, or None for a name outside the dataset's pattern."""
    try:
        ids = module.parse_name(path)
    except DataFormatError:
        return None
    return ids.label if hasattr(ids, "label") else module.ACTIONS.index(ids[0])


def _pyskl_source(encoder: Encoder, path: str, split: str | None) -> Source:
    from .data import pyskl

    data = pyskl.read_pyskl(path, encoder.layout)
    anns = data["annotations"]
    if split is not None:
        if split not in data["split"]:
            raise ValueError(f"{path}: no split {split!r}; it has {sorted(data['split'])}")
        wanted = set(data["split"][split])
        anns = [a for a in anns if a["frame_dir"] in wanted]
    if not anns:
        raise DataFormatError(path, "no annotations" + (f" in split {split!r}" if split else ""))
    first = anns[0]
    channels = ",".join(pyskl.channel_names(first["keypoint"].shape[3], pyskl.score_of(first) is not None))
    _check_fits(encoder, encoder.layout, channels, path)
    for k, a in enumerate(anns):
        if (a["keypoint"].shape[3], pyskl.score_of(a) is not None) != (first["keypoint"].shape[3],
                                                                      pyskl.score_of(first) is not None):
            raise DataFormatError(path, f"annotation {k} ({a['frame_dir']!r}): its channels differ from the first's "
                                  f"({channels})")
    names = [check_name(a["frame_dir"], path, "sample name") for a in anns]
    options = _options(encoder, "pyskl")
    bodies = (encoder.recipe or {}).get("bodies") or max(a["keypoint"].shape[0] for a in anns)
    options["bodies"] = bodies
    num_labels = max(int(a["label"]) for a in anns) + 1

    def batches(size):
        for start in range(0, len(anns), size):
            batch = []
            for i in range(start, min(start + size, len(anns))):
                payload = (anns[i]["keypoint"], pyskl.score_of(anns[i]))
                batch.append((names[i], int(anns[i]["label"]), _prepare_one(pyskl._task, options, path, payload)))
            yield batch

    return Source(f"{path}" + (f" ({split})" if split else ""), len(anns),
                  pyskl._classes(encoder.layout.name, num_labels, names), batches, {"pyskl": str(path), "split": split,
                                                                                     "options": options})


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
    from .viz import plot_embedding

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
        source = _prepared_source(encoder, args.data, args.split or "val")
    elif args.raw is not None:
        source = _raw_source(encoder, args.raw, args.workers)
    else:
        source = _pyskl_source(encoder, args.pyskl, args.split)
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
