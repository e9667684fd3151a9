"""PKU-MMD parts I and II: continuous recordings cut into action clips.

Raw layout: a skeleton folder (part I: ``PKU_Skeleton_Renew``) of ``<video>.txt`` files with one frame per
line (150 values: 2 persons x 25 joints x x, y, z; or 75 for one person; an absent second person is
zeros) and a label folder (part I: ``Train_Label_PKU_final``) of ``<video>.txt`` files with one action per
line: ``action, start_frame, end_frame, confidence`` (1-based, inclusive frames). Video names end in the
camera view: ``0002-L``, ``0002-M``, ``0002-R``.

Benchmarks: ``xview`` trains on the other views and tests on ``test_view`` (L, as in the PKU-MMD paper);
``xsub`` follows the official split file ``cross-subject.txt`` (``Training videos:`` and ``Validation
videos:`` followed by comma-separated video names), which must be given: subjects cannot be told from
file names. Each clip is preprocessed like NTU (same 25-joint Kinect v2 layout).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .errors import DataFormatError, check_name, quote
from .prepare import Candidate, Conversion, Job, RunOptions, build, read_file, read_text, require_dir, skip_or_raise
from .preprocess import has_body, preprocess

CLASSES = (
    "bow", "brushing hair", "brushing teeth", "check time (from watch)", "cheer up", "clapping",
    "cross hands in front (say stop)", "drink water", "drop", "eat meal/snack", "falling",
    "giving something to other person", "hand waving", "handshaking", "hopping (one foot jumping)",
    "hugging other person", "jump up", "kicking other person", "kicking something",
    "make a phone call/answer phone", "pat on back of other person", "pickup", "playing with phone/tablet",
    "point finger at the other person", "pointing to something with finger", "punching/slapping other person",
    "pushing other person", "put on a hat/cap", "put something inside pocket", "reading",
    "rub two hands together", "salute", "sitting down", "standing up", "take off a hat/cap", "take off glasses",
    "take off jacket", "take out something from pocket", "taking a selfie", "tear up paper", "throw",
    "touch back (backache)", "touch chest (stomachache/heart pain)", "touch head (headache)",
    "touch neck (neckache)", "typing on a keyboard", "use a fan (with hand or paper)/feeling warm", "wear jacket",
    "wear on glasses", "wipe face", "writing",
)
assert len(CLASSES) == 51
VIDEO = re.compile(r"^.+-([LMR])$")


def read_labels(path) -> list[tuple[int, int, int]]:
    """``[(label 0-based, start, end)]`` of one label file (1-based inclusive frames)."""
    clips = []
    lines = read_file(path).splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.decode(errors="replace").replace(",", " ").split()]
        if len(parts) != 4:
            raise DataFormatError(path, f"expected 'action, start_frame, end_frame, confidence', found "
                                  f"{len(parts)} values", n)
        try:
            action, start, end = (int(p) for p in parts[:3])
            float(parts[3])
        except ValueError:
            raise DataFormatError(path, f"non-numeric token in {quote(line.strip())}: expected integers "
                                  "'action, start_frame, end_frame' and a confidence", n) from None
        if not 1 <= action <= len(CLASSES):
            raise DataFormatError(path, f"action {action} outside 1..{len(CLASSES)}", n)
        if not 1 <= start <= end:
            raise DataFormatError(path, f"expected 1 <= start_frame <= end_frame, found {start}, {end}", n)
        clips.append((action - 1, start, end))
    if not clips:
        raise DataFormatError(path, "empty label file: expected lines 'action, start_frame, end_frame, confidence'",
                              1)
    return clips


def read_video(path) -> np.ndarray:
    """``(3, T, 25, 2)`` float32 of one skeleton file."""
    lines = read_file(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataFormatError(path, "empty file: expected one line of 150 (or 75) values per frame", 1)
    width = len(lines[0].split())
    if width not in (75, 150):
        raise DataFormatError(path, f"wrong joint count: expected 150 values (2 x 25 joints x 3) or 75, found {width}",
                              1)
    tokens = b" ".join(lines).split()
    values = None
    if len(tokens) == width * len(lines):
        try:
            values = np.array(tokens, dtype=np.float64)
        except ValueError:
            pass
    if values is None:
        for n, line in enumerate(lines, 1):
            parts = line.split()
            if len(parts) != width:
                raise DataFormatError(path, f"expected {width} values as on line 1, found {len(parts)} (truncated?)", n)
            for t in parts:
                try:
                    float(t)
                except ValueError:
                    raise DataFormatError(path, f"non-numeric token {quote(t)}", n) from None
    with np.errstate(over="ignore"):
        values = values.reshape(len(lines), width // 75, 25, 3).astype(np.float32)
    if not np.isfinite(values).all():  # after the cast: 1e39 is a finite float64 but not a float32
        n = int(np.argwhere(~np.isfinite(values))[0][0]) + 1
        raise DataFormatError(path, "non-finite value: coordinates must be finite float32 numbers (magnitude below "
                              "3.4e38)", n)
    out = np.zeros((len(lines), 2, 25, 3), np.float32)
    out[:, : values.shape[1]] = values
    return out.transpose(3, 0, 2, 1)


def _task(job, options):
    path, clips = job.payload
    video = read_video(path)
    results = []
    for i, (start, end) in zip(job.indices, clips):
        if end > video.shape[1]:
            raise DataFormatError(path, f"a label asks for frames {start}-{end}, the file has {video.shape[1]} frames")
        clip = video[:, start - 1:end]
        if not has_body(clip, options["official"]):
            results.append((i, None, None))
        else:
            results.append((i, preprocess(clip, options["frames"], 20, (4, 8), options["official"]), None))
    return results


def read_split_file(path) -> dict[str, str]:
    """``{video: "train" | "val"}`` from an official split file."""
    text = read_text(path)
    out, current = {}, None
    for n, line in enumerate(text.splitlines(), 1):
        head = line.strip().lower()
        if head.startswith("train"):
            current = "train"
            line = line.split(":", 1)[1] if ":" in line else ""
        elif head.startswith("valid") or head.startswith("test"):
            current = "val"
            line = line.split(":", 1)[1] if ":" in line else ""
        for name in (t.strip() for t in line.replace(",", " ").split()):
            if current is None:
                raise DataFormatError(path, "video names before a 'Training videos:' header", n)
            out[name] = current
    if set(out.values()) != {"train", "val"}:
        raise DataFormatError(path, "expected 'Training videos:' and 'Validation videos:' lists")
    return out


def _find(raw: Path, word: str) -> Path:
    found = sorted(p for p in raw.rglob("*") if p.is_dir() and word in p.name.lower() and any(p.glob("*.txt")))
    if not found:
        raise FileNotFoundError(f"PKU-MMD raw data: no folder with '{word}' in its name under {raw} and .txt files "
                                "in it (expected e.g. PKU_Skeleton_Renew/ and Train_Label_PKU_final/)")
    return found[0]


def prepare_pkummd(raw, out, frames: int = 64, split_file=None, test_view: str = "L", official: bool = False,
                   skip_bad: bool = False, workers=None, progress: bool = True, force: bool = False):
    """Cut the PKU-MMD recordings under ``raw`` into clips and write ``out/xview`` (and ``out/xsub`` when
    ``split_file`` is given)."""
    raw = require_dir(raw, "PKU-MMD raw data")
    if test_view not in ("L", "M", "R"):
        raise ValueError(f"test_view must be L, M or R; got {test_view!r}")
    skeleton_dir, label_dir = _find(raw, "skeleton"), _find(raw, "label")
    subjects = read_split_file(split_file) if split_file else None
    candidates, jobs, bad = [], [], []
    for entry in sorted(os.scandir(skeleton_dir), key=lambda e: e.name):
        if not entry.name.endswith(".txt"):
            continue
        video = entry.name[:-4]
        try:
            m = VIDEO.fullmatch(video)
            if m is None:
                raise DataFormatError(entry.path, "unknown file-name pattern: expected <video>-L|M|R.txt")
            check_name(video, entry.path, "video name")
            label_path = label_dir / entry.name
            if not os.path.lexists(label_path):
                raise DataFormatError(entry.path, f"no label file {label_path}")
            clips = read_labels(label_path)
        except DataFormatError as err:
            skip_or_raise(err, video, bad, skip_bad)
            continue
        splits = {"xview": "val" if m.group(1) == test_view else "train"}
        if subjects is not None:
            if video not in subjects:
                err = DataFormatError(split_file, f"video {video} is in neither list of the split file")
                skip_or_raise(err, video, bad, skip_bad)
                continue
            splits["xsub"] = subjects[video]
        first = len(candidates)
        for k, (label, start, end) in enumerate(clips):
            candidates.append(Candidate(f"{video}_{k:03d}", label, dict(splits)))
        jobs.append(Job(entry.path, list(range(first, len(candidates))),
                        (entry.path, [(s, e) for _, s, e in clips])))
    if not jobs:
        raise FileNotFoundError(f"no usable <video>.txt skeleton files in {skeleton_dir}")
    options = {"frames": frames, "official": official, "test_view": test_view}
    return build(out, Conversion("pkummd", "ntu-rgb+d", CLASSES, frames, 25, 2, candidates, jobs, _task, options,
                                 skipped=bad),
                 RunOptions(skip_bad, workers, progress, force))
