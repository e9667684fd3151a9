"""PYSKL annotation pickles <-> prepared datasets.

A PYSKL file is ``{"split": {name: [frame_dir, ...]}, "annotations": [{"frame_dir", "label",
"keypoint" (M, T, V, C), "total_frames", ...}]}``: 3-D keypoints (C = 3, x y z) or 2-D ones (C = 2, x y,
usually with ``"keypoint_score" (M, T, V)``, which becomes a third input channel; next to 3-D keypoints a
score is not used). It is read with the
restricted unpickler (plain containers and numpy arrays only; the file's content is never executed). Split
names ``<benchmark>_<split>`` (``xsub_train``, ``xview_val``, ...) become ``out/<benchmark>/<split>``;
unprefixed names (``train``) make one dataset in ``out``. Split names and ``frame_dir`` become file names and
lines, so they are checked (:func:`~.errors.check_name`) before anything is written. The layout comes from the
joint count (17: coco-17, 20: nw-ucla, 25: ntu-rgb+d) or ``layout`` (a shipped name or a layout file), and
its ``origin`` and ``x_axis`` joints drive the preprocessing (2-D data is centred, not rotated). A pickle is
held in memory whole by nature, so :func:`export_pyskl` builds it in memory too.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from ..graph import LAYOUTS, Layout, get_layout, layout_value
from .errors import DataFormatError, quote
from .prepare import Candidate, Conversion, Job, RunOptions, build
from .prepared import channels_of, read_meta
from .preprocess import preprocess
from .safe_pickle import load as safe_load

_BY_JOINTS = {layout.num_joints: layout for layout in LAYOUTS.values()}  # the layout a joint count stands for
_EXPECTED = " or ".join(f"{v} ({layout.name})" for v, layout in sorted(_BY_JOINTS.items()))


def read_pyskl(path, layout: str | dict | Layout | None = None) -> dict:
    """Load and validate a PYSKL annotation pickle (keypoints of ``layout``'s joint count, or of a shipped
    layout's when None)."""
    joints = None if layout is None else get_layout(layout).num_joints
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
        if C not in (2, 3):
            raise DataFormatError(path, f"{where}: keypoints have {C} coordinates; expected 2 (x, y) or 3 (x, y, z)")
        if V != joints and (joints is not None or V not in _BY_JOINTS):
            expected = f"{joints} (layout {get_layout(layout).name})" if joints is not None else \
                f"{_EXPECTED} (or pass a layout file)"
            raise DataFormatError(path, f"{where}: wrong joint count: expected {expected}, found {V}")
        score = score_of(ann)
        if score is not None:
            if not isinstance(score, np.ndarray) or score.shape != (M, T, V) \
                    or not np.issubdtype(score.dtype, np.floating):
                raise DataFormatError(path, f"{where}: 'keypoint_score' must be a float array of the keypoints' "
                                      f"(M, T, V) = {(M, T, V)}; got {getattr(score, 'shape', type(score).__name__)}")
            with np.errstate(over="ignore"):
                if not np.isfinite(score.astype(np.float32)).all():
                    raise DataFormatError(path, f"{where}: non-finite keypoint_score values")
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


def score_of(ann: dict):
    """The detection scores that become an input channel: ``keypoint_score`` of 2-D keypoints (None otherwise)."""
    return ann.get("keypoint_score") if ann["keypoint"].shape[3] == 2 else None


def _task(job, options):
    """One annotation ``(keypoint (M, T, V, C), keypoint_score (M, T, V) or None)`` -> a prepared sample."""
    kp, score = job.payload
    channels = kp.shape[3] + (score is not None)
    x = np.zeros((channels, kp.shape[1], kp.shape[2], options["bodies"]), np.float32)
    x[: kp.shape[3], ..., : kp.shape[0]] = kp.transpose(3, 1, 2, 0)[..., : options["bodies"]]
    if score is not None:
        x[-1, ..., : kp.shape[0]] = score.transpose(1, 2, 0)[..., : options["bodies"]]
    if options["preprocessing"] == "full" and not np.abs(x).any():
        return [(job.indices[0], None, None)]
    out = preprocess(x, options["frames"], options["origin"], options["x_axis"], options["official"],
                     options["preprocessing"], coords=kp.shape[3])
    return [(job.indices[0], out, None)]


def channel_names(coords: int, score: bool) -> list[str]:
    return ["x", "y", "z"][:coords] + ["score"] * score


def prepare_pyskl(pkl, out, frames: int = 64, layout: str | None = None, preprocessing: str = "full",
                  official: bool = False, skip_bad: bool = False, workers=None, progress: bool = True,
                  force: bool = False):
    """Convert a PYSKL annotation pickle (3-D, or 2-D with or without scores) into prepared datasets
    (``preprocessing="resize"``: only the temporal resize, for data that is already preprocessed). ``layout``:
    a shipped layout's name or a layout file; by default the shipped layout of the keypoints' joint count."""
    if preprocessing not in ("full", "resize"):
        raise ValueError(f"preprocessing must be 'full' or 'resize'; got {preprocessing!r}")
    given = None if layout is None else get_layout(layout)
    data = read_pyskl(pkl, given)
    anns = data["annotations"]
    if not anns:
        raise DataFormatError(pkl, "no annotations")
    for what, kinds in (("joint counts", {a["keypoint"].shape[2] for a in anns}),
                        ("2-D and 3-D keypoints", {a["keypoint"].shape[3] for a in anns}),
                        ("2-D keypoints with and without keypoint_score",
                         {score_of(a) is not None for a in anns})):
        if len(kinds) != 1:
            raise DataFormatError(pkl, f"annotations mix {what}" + (f" {sorted(kinds)}" if what == "joint counts"
                                                                     else ""))
    _, _, V, coords = anns[0]["keypoint"].shape
    score = score_of(anns[0]) is not None
    layout = given or _BY_JOINTS[V]
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
    classes = _classes(layout.name, num_labels, [a["frame_dir"] for a in anns])
    candidates, jobs, unsplit = [], [], 0
    for ann in anns:
        splits = where.get(ann["frame_dir"])
        if not splits:
            unsplit += 1
            continue
        jobs.append(Job(str(pkl), [len(candidates)], (ann["keypoint"], score_of(ann))))  # key: the file
        candidates.append(Candidate(ann["frame_dir"], int(ann["label"]), splits))
    if unsplit:
        print(f"note: {unsplit} annotations are in no split and were left out")
    options = {"frames": frames, "bodies": bodies, "origin": list(layout.origin),
               "x_axis": list(layout.x_axis) if layout.x_axis else None, "official": official,
               "preprocessing": preprocessing}
    channels = channel_names(coords, score)
    # The keypoints are already in memory: worker processes would only copy them.
    return build(out, Conversion(f"pyskl:{Path(pkl).name}", layout_value(layout), classes, frames, V, bodies,
                                 candidates, jobs, _task, options, channels=len(channels), split_names=(),
                                 extra_meta={"channels": channels}),
                 RunOptions(skip_bad, workers=1, progress=progress, force=force))


def _classes(layout: str, n: int, frame_dirs):
    from . import ntu, nwucla
    ntu_names = all(ntu.NAME.fullmatch(name) for name in frame_dirs)  # e.g. PYSKL's 2-D ntu60_hrnet.pkl
    if (layout == "ntu-rgb+d" or ntu_names) and n <= 120:
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
    score = channels_of(meta, prepared / "meta.json") == "x,y,score"
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
            ann = {"frame_dir": name, "label": int(label), "keypoint": kp, "total_frames": kp.shape[1]}
            if score:
                ann["keypoint"], ann["keypoint_score"] = np.ascontiguousarray(kp[..., :2]), kp[..., 2].copy()
            anns.append(ann)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"split": split, "annotations": anns}, f, protocol=4)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return len(anns)
