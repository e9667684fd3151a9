"""The on-disk format of prepared datasets, shared by every dataset converter and the generated demo data.

A prepared dataset is a folder::

    meta.json               {"format": "skelemix-prepared/1", "dataset", "layout", "classes", "frames",
                             "bodies", "splits": {split: size}, "channels", "options"}
    <split>_data.npy        float32 (N, C, T, V, M), memory-mappable
    <split>_label.npy       int64 (N,), 0-based class index
    <split>_names.txt       N sample names, one per line

``layout`` is a shipped layout's name or, for a layout from a file, the file's mapping (see
:mod:`skelemix.graph`); ``channels`` names the C input channels: ``["x", "y", "z"]`` (the default when absent),
``["x", "y"]`` or ``["x", "y", "score"]`` (2-D keypoints and their detection score); ``options`` are the
converter's settings (frame count, preprocessing), which ``python -m skelemix.embed`` replays on raw files.

Everything is written under a temporary name and renamed last, so an interrupted write never leaves a
split that looks complete.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataFormatError, quote

FORMAT = "skelemix-prepared/1"
CHANNELS = ("x,y,z", "x,y", "x,y,score")  # the input channels a dataset can hold, as config values
_CHECK_CHUNK = 4 << 20  # bytes the finiteness check reads at a time: cache-sized, so memory stays flat


def _replace_atomically(tmp: Path, final: Path):
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_split(root: str | os.PathLike, split: str, data: np.ndarray, labels: np.ndarray,
                names: list[str] | None = None) -> None:
    """Write one split from arrays in memory (converters of large datasets write the same files as memmaps)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data = np.asarray(data, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 5 or labels.shape != (len(data),):
        raise ValueError(f"data must be (N, C, T, V, M) and labels (N,); got {data.shape} and {labels.shape}")
    names = names if names is not None else [f"{split}{i:06d}" for i in range(len(data))]
    if len(names) != len(data):
        raise ValueError(f"got {len(names)} names for {len(data)} samples")
    for suffix, write in (("_data.npy", lambda f: np.save(f, data)), ("_label.npy", lambda f: np.save(f, labels)),
                          ("_names.txt", lambda f: f.write("".join(f"{n}\n" for n in names).encode()))):
        final = root / f"{split}{suffix}"
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            write(f)
        _replace_atomically(tmp, final)


def write_meta(root: str | os.PathLike, *, dataset: str, layout: str, classes: list[str], frames: int, bodies: int,
               splits: dict[str, int], **extra) -> None:
    """Write ``meta.json`` (last, after the splits: its presence marks a complete dataset)."""
    root = Path(root)
    meta = {"format": FORMAT, "dataset": dataset, "layout": layout, "classes": list(classes), "frames": frames,
            "bodies": bodies, "splits": dict(splits), **extra}
    tmp = root / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    _replace_atomically(tmp, root / "meta.json")


def read_meta(root: str | os.PathLike) -> dict:
    path = Path(root) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not a prepared dataset (or its preparation did not "
                                "finish); prepare one with `python -m skelemix.data`")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def channels_of(meta: dict, source="meta.json") -> str:
    """The channels of a prepared dataset's ``meta`` as a :data:`CHANNELS` value ("x,y,z" when not recorded)."""
    channels = meta.get("channels", ["x", "y", "z"])
    text = ",".join(channels) if isinstance(channels, list) and all(isinstance(c, str) for c in channels) else None
    if text not in CHANNELS:
        raise DataFormatError(source, f"channels: expected one of {[c.split(',') for c in CHANNELS]}; got "
                              f"{quote(channels)}")
    return text


def recipe(meta: dict) -> dict | None:
    """How the samples of a prepared dataset were made, for preparing new inputs the same way (the trainer keeps
    it in its checkpoints): the meta.json entries ``dataset``, ``layout``, ``channels``, ``frames``, ``bodies`` and
    ``options`` (the converter's settings). None for data without a meta.json (generated in memory)."""
    if "dataset" not in meta:
        return None
    keys = ("dataset", "layout", "channels", "frames", "bodies", "options")
    return {k: meta[k] for k in keys if k in meta}


def coordinates(channels: str) -> int:
    """How many of the ``channels`` (a :data:`CHANNELS` value) are coordinates: 3 or 2 (then maybe a score)."""
    return 3 if channels == "x,y,z" else 2


def check_finite(data: np.ndarray, path: str | os.PathLike, split: str) -> None:
    """Refuse a split holding NaN or inf, naming the first bad sample: such data trains to NaN, and a bad
    validation split only shows as chance accuracy. One pass in fixed-size chunks; a memory map is read
    through the file, so its pages do not pile up in this process. 2 GB take about 0.3-0.5 s from the page
    cache; from disk the pass runs at the disk's speed and leaves the split cached for training."""
    per = max(1, _CHECK_CHUNK // max(1, data[:1].nbytes))
    buf = np.empty((min(per, len(data)),) + data.shape[1:], data.dtype)
    finite = np.empty(buf.shape, bool)
    by_file = isinstance(data, np.memmap) and data.flags.c_contiguous
    with open(data.filename, "rb", buffering=0) if by_file else contextlib.nullcontext() as f:
        if by_file:
            f.seek(data.offset)
        for start in range(0, len(data), per):
            block = buf[: min(per, len(data) - start)]
            if by_file:
                f.readinto(memoryview(block.reshape(-1)).cast("B"))
            else:
                block[...] = data[start: start + len(block)]
            if np.isfinite(block, out=finite[: len(block)]).all():
                continue
            first = int(np.argmin(finite[: len(block)]))  # the first False in file order
            i, c, t, v, m = np.unravel_index(first, block.shape)
            raise DataFormatError(path, f"split {split!r}: sample {start + i} holds {block.flat[first]} (channel {c}, "
                                  f"frame {t}, joint {v}, body {m}); prepared data must be finite: prepare the "
                                  "dataset again from its raw files")


def read_rows(data: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a split as a new array. A memory map is read through its file (as
    :func:`check_finite` does), so the rows read do not stay mapped in this process: reading a whole split in
    batches keeps memory flat."""
    if not (isinstance(data, np.memmap) and data.flags.c_contiguous):
        return np.array(data[start:stop])
    out = np.empty((max(0, min(stop, len(data)) - start),) + data.shape[1:], data.dtype)
    view = memoryview(out.reshape(-1)).cast("B")
    with open(data.filename, "rb", buffering=0) as f:
        f.seek(data.offset + start * (out.nbytes // max(len(out), 1)))
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise DataFormatError(data.filename, f"the file ends before row {stop} (truncated?)")
            done += n
    return out


class ArrayDataset(Dataset):
    """Skeleton arrays ``(N, C, T, V, M)`` with labels; ``dataset[i]`` is ``(float32 tensor (C, T, V, M), int
    label)`` (augmentation happens later, batched on the device). ``indices`` restricts it to a subset (e.g.
    the semi-supervised labelled part); ``classes`` names the labels."""

    def __init__(self, data: np.ndarray, labels: np.ndarray, classes, indices=None, meta: dict | None = None):
        self.data, self.labels = data, np.asarray(labels, dtype=np.int64)
        self.meta = meta or {"classes": list(classes)}
        self.indices = np.arange(len(self.data)) if indices is None else np.asarray(indices, dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def targets(self) -> np.ndarray:
        return self.labels[self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        return torch.from_numpy(np.array(self.data[j], dtype=np.float32)), int(self.labels[j])


class PreparedDataset(ArrayDataset):
    """One split of a prepared dataset; ``data`` is a read-only memory map unless ``mmap=False``. Opening it reads
    the whole split once to refuse non-finite values (:func:`check_finite`) unless ``check=False``."""

    def __init__(self, root: str | os.PathLike, split: str, mmap: bool = True, indices=None, check: bool = True):
        self.root = Path(root)
        meta = read_meta(self.root)
        if split not in meta["splits"]:
            raise ValueError(f"{self.root}: split {split!r} not found; available: {sorted(meta['splits'])}")
        data_path, label_path = self.root / f"{split}_data.npy", self.root / f"{split}_label.npy"
        data = np.load(data_path, mmap_mode="r" if mmap else None)
        labels = np.load(label_path)
        n, C = meta["splits"][split], len(channels_of(meta, self.root / "meta.json").split(","))
        if data.ndim != 5 or data.dtype != np.float32 or len(data) != n or data.shape[1] != C:
            raise ValueError(f"{data_path}: expected float32 (N={n}, C={C}, T, V, M); got {data.dtype} {data.shape}")
        if labels.shape != (n,) or labels.dtype != np.int64:
            raise ValueError(f"{label_path}: expected int64 ({n},); got {labels.dtype} {labels.shape}")
        bad = (labels < 0) | (labels >= len(meta["classes"]))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{label_path}: label {labels[i]} of sample {i} is outside [0, {len(meta['classes'])})")
        if check:
            check_finite(data, data_path, split)
        super().__init__(data, labels, meta["classes"], indices, meta)
        self.split = split
