"""Northwestern-UCLA Multiview Action 3D in the ``all_sqe`` JSON form: ``aXX_sYY_eZZ_vWW.json`` (action,
subject, episode, view) holding ``{"file_name", "skeletons": [T][20][3]}`` (Kinect v1, 20 joints, one body).

Standard cross-view protocol: views 1 and 2 train (1,020 samples), view 3 tests (464); actions a01-a06, a08,
a09, a11, a12 are the 10 classes. When ``val_label.pkl`` (CTR-GCN's test list) sits next to ``all_sqe``, it
is read with the restricted unpickler and the test split is checked against it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from .errors import DataFormatError, quote
from .prepare import Candidate, Conversion, Job, RunOptions, build, read_file, require_dir, skip_or_raise
from .preprocess import CENTRES, has_body, preprocess
from .safe_pickle import load as safe_load

NUM_JOINTS = 20
NAME = re.compile(r"a([0-9]{2})_s([0-9]{2})_e([0-9]{2})_v([0-9]{2})")  # whole name (fullmatch)
ACTIONS = (1, 2, 3, 4, 5, 6, 8, 9, 11, 12)
CLASSES = ("pick up with one hand", "pick up with two hands", "drop trash", "walk around", "sit down", "stand up",
           "donning", "doffing", "throw", "carry")
TRAIN_VIEWS, TEST_VIEW = (1, 2), 3
CENTER, SHOULDERS = 2, (4, 8)  # shoulder centre; left and right shoulders (0-based)


def parse_name(path) -> tuple[int, int, int, int]:
    """``(action, subject, episode, view)`` from ``aXX_sYY_eZZ_vWW[.json]``; an action or view outside the
    dataset raises :class:`DataFormatError`."""
    stem = Path(path).name
    stem = stem[:-5] if stem.endswith(".json") else stem
    m = NAME.fullmatch(stem)
    if m is None:
        raise DataFormatError(path, "unknown file-name pattern: expected aXX_sYY_eZZ_vWW.json (action, subject, "
                              "episode, view)")
    action, subject, episode, view = map(int, m.groups())
    if action not in ACTIONS:
        raise DataFormatError(path, f"unknown action a{action:02d}: NW-UCLA has actions {ACTIONS}")
    if view not in (*TRAIN_VIEWS, TEST_VIEW):
        raise DataFormatError(path, f"unknown view v{view:02d}: NW-UCLA has views 1-3")
    return action, subject, episode, view


def read_sequence(path) -> np.ndarray:
    """``(3, T, 20, 1)`` float32 coordinates of one JSON file."""
    text = read_file(path)
    if not text.strip():
        raise DataFormatError(path, "empty file: expected a JSON object with 'skeletons'", 1)
    try:
        obj = json.loads(text, parse_int=float)  # a 5000-digit integer becomes inf (refused below), not an error
    except json.JSONDecodeError as err:
        raise DataFormatError(path, f"not valid JSON ({err.msg})", err.lineno) from None
    except UnicodeDecodeError as err:
        raise DataFormatError(path, f"not valid JSON: not UTF-8 text (byte offset {err.start}: {err.reason})") from None
    except RecursionError:
        raise DataFormatError(path, "not valid JSON for this format: nested too deeply (expected [T][20][3] lists)") \
            from None
    if not isinstance(obj, dict) or "skeletons" not in obj:
        raise DataFormatError(path, "expected a JSON object with a 'skeletons' list [T][20][3]")
    frames = obj["skeletons"]
    if not isinstance(frames, list) or not frames:
        raise DataFormatError(path, "'skeletons' must be a non-empty list of frames [T][20][3]")
    for t, frame in enumerate(frames):
        if not isinstance(frame, list) or len(frame) != NUM_JOINTS:
            n = len(frame) if isinstance(frame, list) else f"a {type(frame).__name__}"
            raise DataFormatError(path, f"wrong joint count in frame {t}: expected {NUM_JOINTS} joints, found {n}")
        for j, joint in enumerate(frame):
            if not isinstance(joint, list) or len(joint) != 3 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in joint):
                raise DataFormatError(path, f"frame {t} joint {j}: expected 3 numbers (x, y, z), found {quote(joint)}")
    x = np.asarray(frames, dtype=np.float64)
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():  # 1e39 is a finite float64 but not a float32
        t, j, _ = np.argwhere(~np.isfinite(x32))[0]
        raise DataFormatError(path, f"frame {t} joint {j}: non-finite coordinate {x[t, j].tolist()}: x, y, z must "
                              "be finite float32 numbers (magnitude below 3.4e38)")
    return x32.transpose(2, 0, 1)[..., None]


def _task(job, options):
    raw = read_sequence(job.payload)
    if not has_body(raw, options["official"]):
        return [(job.indices[0], None, None)]
    return [(job.indices[0], preprocess(raw, options["frames"], CENTER, SHOULDERS, options["official"],
                                        centre=options.get("centre", "frame")), None)]


def prepare_nwucla(raw, out, frames: int = 64, official: bool = False, skip_bad: bool = False, workers=None,
                   progress: bool = True, force: bool = False, centre: str = "frame", tuning: bool = False):
    """Convert ``raw/all_sqe/*.json`` (or ``raw/*.json``) into the prepared dataset ``out`` (splits train and
    val, ``(N, 3, frames, 20, 1)``). ``centre``: ``"frame"`` centres and rotates every frame on its own shoulder
    centre (the NTU convention), ``"first"`` all frames on the first frame's, keeping the global motion
    (:func:`~skelemix.data.preprocess.preprocess`). ``tuning``: train on view 1, validate on view 2 and leave the
    test view 3 out, for choosing settings without looking at the test view."""
    if centre not in CENTRES:
        raise ValueError(f"centre must be one of {', '.join(CENTRES)}; got {centre!r}")
    raw = require_dir(raw, "NW-UCLA raw data (the folder holding all_sqe/)")
    folder = raw / "all_sqe" if (raw / "all_sqe").is_dir() else raw
    files = sorted(e.path for e in os.scandir(folder) if e.name.endswith(".json"))
    if not files:
        raise FileNotFoundError(f"no .json files in {folder} (expected the all_sqe files aXX_sYY_eZZ_vWW.json)")
    train_views, val_view = ((1,), 2) if tuning else (TRAIN_VIEWS, TEST_VIEW)
    candidates, jobs, bad = [], [], []
    for path in files:
        try:
            action, _, _, view = parse_name(path)
        except DataFormatError as err:
            skip_or_raise(err, Path(path).stem, bad, skip_bad)
            continue
        if view not in train_views and view != val_view:
            continue
        split = "train" if view in train_views else "val"
        jobs.append(Job(path, [len(candidates)], path))
        candidates.append(Candidate(Path(path).stem, ACTIONS.index(action), {None: split}))
    labels_file = raw / "val_label.pkl"
    if labels_file.is_file() and val_view == TEST_VIEW:  # CTR-GCN's list is of the test view
        _check_val_list(labels_file, [c for c in candidates if c.splits[None] == "val"], skip_bad)
    options = {"frames": frames, "official": official}
    if centre != "frame":  # the default adds no key: data prepared before the option keeps its settings
        options["centre"] = centre
    if tuning:
        options["tuning"] = True
    return build(out, Conversion("nwucla", "nw-ucla", CLASSES, frames, NUM_JOINTS, 1, candidates, jobs, _task,
                                 options, skipped=bad),
                 RunOptions(skip_bad, workers, progress, force))


def _check_val_list(path, val, skip_bad):
    """The view-3 files must be exactly CTR-GCN's test list, with the same labels (1-based there)."""
    entries = safe_load(path)
    try:
        expected = {e["file_name"]: int(e["label"]) - 1 for e in entries}
    except (TypeError, KeyError, ValueError):
        raise DataFormatError(path, "expected a list of {'file_name', 'length', 'label'} dicts") from None
    ours = {c.name: c.label for c in val}
    if skip_bad:  # files skipped as bad may be absent
        expected = {k: v for k, v in expected.items() if k in ours}
    if ours != expected:
        only_ours, only_list = sorted(set(ours) - set(expected)), sorted(set(expected) - set(ours))
        relabelled = sorted(k for k in set(ours) & set(expected) if ours[k] != expected[k])
        raise DataFormatError(path, f"the view-3 files disagree with this test list: {len(only_ours)} not listed "
                              f"{only_ours[:3]}, {len(only_list)} listed but absent {only_list[:3]}, "
                              f"{len(relabelled)} with another label {relabelled[:3]}")
