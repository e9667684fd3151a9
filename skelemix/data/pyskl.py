"""PYSKL annotation pickles <-> prepared datasets.

A PYSKL file is ``{"split": {name: [frame_dir, ...]}, "annotations": [{"frame_dir", "label",
"keypoint" (M, T, V, C), "total_frames", ...}]}``. It is read with the restricted unpickler (plain
containers and numpy arrays only; the file's content is never executed). Split names ``<benchmark>_<split>``
(``xsub_train``, ``xview_val``, ...) become ``out/<benchmark>/<split>``; unprefixed names (``train``) make
one dataset in ``out``. Split names and ``frame_dir`` become file names and lines, so they are checked
(:func:`~.errors.check_name`) before anything is written. 3D keypoints of 25 (NTU) or 20 (NW-UCLA) joints
are supported. A pickle is held in memory whole by nature, so :func:`export_pyskl` builds it in memory too.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from .errors import DataFormatError, quote
from .prepare import Candidate, Job, build
from .prepared import read_meta
from .preprocess import preprocess
from .safe_pickle import load as safe_load

_LAYOUTS = {25: ("ntu-rgb+d", 20), 20: ("nw-ucla", 2)}  # joints -> (layout, centre joint)
_LAYOUT_NAMES = sorted(name for name, _ in _LAYOUTS.values())


def read_pyskl(path) -> dict:
    """Load and validate a PYSKL annotation pickle."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"PYSKL annotation file {path} not found")
    if not path.is_file():  # a FIFO would block the read forever
        raise DataFormatError(path, "expected a regular file (a PYSKL annotation .pkl)")
    if path.stat().st_size == 0:
        raise DataFormatError(path, "empty file: expected a pickled {'split', 'annotations'} dict")
    data = safe_load(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) \
            or not isinstance(data.get("split"), dict):
        raise DataFormatError(path, "expected a dict with 'split' (dict of name lists) and 'annotations' (list)")
    for split, names in data["split"].items():
        if not isinstance(split, str) or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataFormatError(path, f"split {quote(split)}: expected a split name mapped to a list of frame_dir "
                                  "names")
    for k, ann in enumerate(data["annotations"]):
        where = f"annotation {k}"
        if not isinstance(ann, dict) or not {"frame_dir", "label", "keypoint"} <= set(ann):
            raise DataFormatError(path, f"{where}: expected a dict with 'frame_dir', 'label', 'keypoint'")
        if not isinstance(ann["frame_dir"], str):
            raise DataFormatError(path, f"{where}: 'frame_dir' must be a string; found {quote(ann['frame_dir'])}")
        where = f"annotation {k} ({quote(ann['frame_dir'])})"
        kp = ann["keypoint"]
        if not isinstance(kp, np.ndarray) or kp.ndim != 4 or not np.issubdtype(kp.dtype, np.floating):
            raise DataFormatError(path, f"{where}: 'keypoint' must be a float array (M, T, V, C); got "
                                  f"{getattr(kp, 'shape', type(kp).__name__)}")
        M, T, V, C = kp.shape
        if C != 3:
            raise DataFormatError(path, f"{where}: keypoints have {C} coordinates; only 3D (C = 3) is supported")
        if V not in _LAYOUTS:
            raise DataFormatError(path, f"{where}: wrong joint count: expected 25 (NTU) or 20 (NW-UCLA), found {V}")
        if T < 1 or M < 1:
            raise DataFormatError(path, f"{where}: empty keypoint array {kp.shape}")
        if "total_frames" in ann and (not isinstance(ann["total_frames"], (int, np.integer))
                                      or ann["total_frames"] != T):
            raise DataFormatError(path, f"{where}: total_frames is {quote(ann['total_frames'])} but the keypoints "
                                  f"have {T}")
        with np.errstate(over="ignore"):
            finite = np.isfinite(kp.astype(np.float32)).all()  # 1e39 is a finite float64 but not a float32
        if not finite:
            raise DataFormatError(path, f"{where}: non-finite keypoint values (or beyond the float32 range, 3.4e38)")
        if not isinstance(ann["label"], (int, np.integer)) or ann["label"] < 0:
            raise DataFormatError(path, f"{where}: label must be an integer >= 0; got {quote(ann['label'])}")
    return data


def _task(job, options):
    kp = job.payload  # (M, T, V, C)
    x = np.zeros((3, kp.shape[1], kp.shape[2], options["bodies"]), np.float32)
    x[..., : kp.shape[0]] = kp.transpose(3, 1, 2, 0)[..., : options["bodies"]]
    if options["preprocessing"] == "full" and not np.abs(x).any():
        return [(job.indices[0], None, None)]
    out = preprocess(x, options["frames"], options["center"], (4, 8), options["official"], options["preprocessing"])
    return [(job.indices[0], out, None)]


def prepare_pyskl(pkl, out, frames: int = 64, layout: str | None = None, preprocessing: str = "full",
                  official: bool = False, skip_bad: bool = False, workers=None, progress: bool = True,
                  force: bool = False):
    """Convert a PYSKL 3D annotation pickle into prepared datasets (``preprocessing="resize"``: only the
    temporal resize, for data that is already preprocessed)."""
    if preprocessing not in ("full", "resize"):
        raise ValueError(f"preprocessing must be 'full' or 'resize'; got {preprocessing!r}")
    if layout is not None and layout not in _LAYOUT_NAMES:
        raise ValueError(f"layout must be one of {_LAYOUT_NAMES}; got {layout!r}")
    data = read_pyskl(pkl)
    anns = data["annotations"]
    if not anns:
        raise DataFormatError(pkl, "no annotations")
    joints = {a["keypoint"].shape[2] for a in anns}
    if len(joints) != 1:
        raise DataFormatError(pkl, f"annotations mix joint counts {sorted(joints)}")
    V = joints.pop()
    if layout not in (None, _LAYOUTS[V][0]):
        raise DataFormatError(pkl, f"the keypoints have {V} joints, the {_LAYOUTS[V][0]} layout; --layout {layout} "
                              "needs another joint count")
    layout = _LAYOUTS[V][0]
    bodies = max(a["keypoint"].shape[0] for a in anns)
    where = {}
    prefixed = any("_" in s for s in data["split"])
    for split, names in data["split"].items():
        bm, part = split.rsplit("_", 1) if prefixed and "_" in split else (None, split)
        if prefixed and bm is None:
            raise DataFormatError(pkl, f"split {split!r} has no benchmark prefix while others have")
        for name in names:
            where.setdefault(name, {})[bm] = part
    num_labels = max(int(a["label"]) for a in anns) + 1
    classes = _classes(layout, num_labels)
    candidates, jobs, unsplit = [], [], 0
    for ann in anns:
        splits = where.get(ann["frame_dir"])
        if not splits:
            unsplit += 1
            continue
        jobs.append(Job(str(pkl), [len(candidates)], ann["keypoint"]))  # the key names the file in errors
        candidates.append(Candidate(ann["frame_dir"], int(ann["label"]), splits))
    if unsplit:
        print(f"note: {unsplit} annotations are in no split and were left out")
    options = {"frames": frames, "bodies": bodies, "center": _LAYOUTS[V][1], "official": official,
               "preprocessing": preprocessing}
    # The keypoints are already in memory: worker processes would only copy them.
    return build(out, dataset=f"pyskl:{Path(pkl).name}", layout=layout, classes=classes, frames=frames, joints=V,
                 bodies=bodies, candidates=candidates, jobs=jobs, task=_task, options=options, skip_bad=skip_bad,
                 workers=1, progress=progress, force=force, split_names=())


def _classes(layout, n):
    from . import ntu, nwucla
    if layout == "ntu-rgb+d" and n <= 120:
        return list(ntu.CLASSES[: 60 if n <= 60 else 120])
    if layout == "nw-ucla" and n <= 10:
        return list(nwucla.CLASSES)
    return [f"class {k}" for k in range(n)]


def export_pyskl(prepared, out) -> int:
    """Write the prepared dataset ``prepared`` as a PYSKL pickle at ``out``; returns the annotation count.
    Split ``s`` of a benchmark folder ``b`` becomes ``b_s`` (``xsub_train``)."""
    prepared = Path(prepared)
    meta = read_meta(prepared)
    bm = meta.get("benchmark")
    split, anns = {}, []
    for s in meta["splits"]:
        data = np.load(prepared / f"{s}_data.npy", mmap_mode="r")
        labels = np.load(prepared / f"{s}_label.npy")
        names = (prepared / f"{s}_names.txt").read_text().splitlines()
        if not (len(data) == len(labels) == len(names)):
            raise ValueError(f"{prepared}: split {s} has {len(data)} samples, {len(labels)} labels, {len(names)} names")
        split[f"{bm}_{s}" if bm else s] = list(names)
        for x, label, name in zip(data, labels, names):
            kp = np.ascontiguousarray(np.asarray(x, np.float32).transpose(3, 1, 2, 0))  # (M, T, V, C)
            anns.append({"frame_dir": name, "label": int(label), "keypoint": kp, "total_frames": kp.shape[1]})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"split": split, "annotations": anns}, f, protocol=4)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return len(anns)
