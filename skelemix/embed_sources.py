"""What ``python -m skelemix.embed`` encodes: a prepared split, raw files or a PYSKL pickle, as a :class:`Source`.

Raw files (NTU ``.skeleton``, NW-UCLA ``.json``) and PYSKL annotations are prepared as the encoder's training
data was: the checkpoint records the converter's settings (frame count, bodies, preprocessing), and the
converters' own per-file functions apply them, in worker processes for raw files. Prepared data is read as it
is, a batch at a time. Each source first checks that its skeletons and channels are what the encoder takes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .data.errors import DataFormatError, check_name
from .data.prepared import channels_of, read_rows
from .data.preprocess import CENTRES
from .graph import Layout, get_layout
from .trained_encoder import Encoder

_RAW_KINDS = {".skeleton": "ntu", ".json": "nwucla"}


@dataclass
class Source:
    """The samples to embed: ``size`` of them (at most), named, labelled where known, read in order."""

    description: str
    size: int
    classes: list[str] | None
    batches: Callable[[int], Iterator[list[tuple[str, int | None, np.ndarray | None]]]]  # None: no body, left out
    preparation: dict = field(default_factory=dict)  # how raw inputs were prepared (for embed.json)


def prepared_source(encoder: Encoder, root: str, split: str) -> Source:
    """Split ``split`` of the prepared dataset at ``root``, as it is (names from ``{split}_names.txt`` if any)."""
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
    if kind == "nwucla":
        out["centre"] = options["centre"] if options.get("centre") in CENTRES else "frame"
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


def raw_source(encoder: Encoder, paths: list[str], workers: int) -> Source:
    """NTU ``.skeleton`` or NW-UCLA ``.json`` files (and folders of them), prepared in ``workers`` processes;
    labelled where a file is named as in its dataset."""
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


def pyskl_source(encoder: Encoder, path: str, split: str | None) -> Source:
    """The annotations of the PYSKL pickle at ``path`` (those of ``split``, or all)."""
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
