"""NTU RGB+D 60/120: the raw ``.skeleton`` text format (docs/DESIGN.md 1.1), file names, splits, body selection.

:func:`read_skeleton` walks the count lines (frames, bodies, joints) in Python and parses all joint lines of
a file in one numpy call; every structural problem raises :class:`DataFormatError` with the file, the
1-based line and what was expected there. LF and CRLF files are both accepted.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataFormatError, quote
from .prepare import (Candidate, Conversion, Job, RunOptions, build, read_file, read_ignore_list, require_dir,
                      skip_or_raise)
from .preprocess import has_body, preprocess

NUM_JOINTS = 25
NAME = re.compile(r"S([0-9]{3})C([0-9]{3})P([0-9]{3})R([0-9]{3})A([0-9]{3})")  # whole name (fullmatch)

# Benchmarks: the official NTU-60 splits (docs/DESIGN.md 1.2) and the NTU-120 protocols (arXiv 1905.04757).
XSUB60_TRAIN = frozenset({1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38})
XSUB120_TRAIN = XSUB60_TRAIN | {45, 46, 47, 49, 50, 52, 53, 54, 55, 56, 57, 58, 59, 70, 74, 78, 80, 81, 82, 83, 84,
                                85, 86, 89, 91, 92, 93, 94, 95, 97, 98, 100, 103}
BENCHMARKS = {"ntu60": ("xsub", "xview"), "ntu120": ("xsub", "xset")}

CLASSES = (
    "drink water", "eat meal/snack", "brushing teeth", "brushing hair", "drop", "pickup", "throw", "sitting down",
    "standing up", "clapping", "reading", "writing", "tear up paper", "wear jacket", "take off jacket",
    "wear a shoe", "take off a shoe", "wear on glasses", "take off glasses", "put on a hat/cap",
    "take off a hat/cap", "cheer up", "hand waving", "kicking something", "reach into pocket", "hopping",
    "jump up", "make a phone call", "playing with phone/tablet", "typing on a keyboard",
    "pointing to something with finger", "taking a selfie", "check time (from watch)", "rub two hands together",
    "nod head/bow", "shake head", "wipe face", "salute", "put the palms together", "cross hands in front",
    "sneeze/cough", "staggering", "falling", "touch head (headache)", "touch chest (stomachache/heart pain)",
    "touch back (backache)", "touch neck (neckache)", "nausea or vomiting condition", "use a fan/feeling warm",
    "punching/slapping other person", "kicking other person", "pushing other person",
    "pat on back of other person", "point finger at the other person", "hugging other person",
    "giving something to other person", "touch other person's pocket", "handshaking",
    "walking towards each other", "walking apart from each other",
    # NTU-120 additions (A061-A120)
    "put on headphone", "take off headphone", "shoot at the basket", "bounce ball", "tennis bat swing",
    "juggling table tennis balls", "hush (quiet)", "flick hair", "thumb up", "thumb down", "make ok sign",
    "make victory sign", "staple book", "counting money", "cutting nails", "cutting paper (using scissors)",
    "snapping fingers", "open bottle", "sniff (smell)", "squat down", "toss a coin", "fold paper",
    "ball up paper", "play magic cube", "apply cream on face", "apply cream on hand back", "put on bag",
    "take off bag", "put something into a bag", "take something out of a bag", "open a box",
    "move heavy objects", "shake fist", "throw up cap/hat", "hands up (both hands)", "cross arms", "arm circles",
    "arm swings", "running on the spot", "butt kicks (kick backward)", "cross toe touch", "side kick", "yawn",
    "stretch oneself", "blow nose", "hit other person with something", "wield knife towards other person",
    "knock over other person (hit with body)", "grab other person's stuff", "shoot at other person with a gun",
    "step on foot", "high-five", "cheers and drink", "carry something with other person",
    "take a photo of other person", "follow other person", "whisper in other person's ear",
    "exchange things with other person", "support somebody with hand", "finger-guessing game",
)
assert len(CLASSES) == 120


@dataclass(frozen=True)
class NtuName:
    setup: int
    camera: int
    subject: int
    replication: int
    action: int

    @property
    def label(self) -> int:
        return self.action - 1


def parse_name(path: str | os.PathLike) -> NtuName:
    """Ids from ``SsssCcccPpppRrrrAaaa.skeleton``; anything else, and ids outside the dataset (action
    A001-A120, camera C001-C003, the others from 001), raises :class:`DataFormatError`."""
    stem = Path(path).name
    stem = stem[: -len(".skeleton")] if stem.endswith(".skeleton") else stem
    m = NAME.fullmatch(stem)
    if m is None:
        raise DataFormatError(path, "unknown file-name pattern: expected SsssCcccPpppRrrrAaaa.skeleton "
                              "(setup, camera, performer, replication, action; 3 digits each)")
    name = NtuName(*map(int, m.groups()))
    for letter, value, last in (("S", name.setup, None), ("C", name.camera, 3), ("P", name.subject, None),
                                ("R", name.replication, None), ("A", name.action, len(CLASSES))):
        if value < 1 or (last is not None and value > last):
            expected = f"{letter}001-{letter}{last:03d}" if last else f"{letter}001 or above"
            raise DataFormatError(path, f"{letter}{value:03d} is outside the dataset: expected {expected}")
    return name


def split_of(name: NtuName, benchmark: str) -> str:
    """``"train"`` or ``"val"`` of a sample under ``xsub`` / ``xview`` (NTU-60) or ``xsub120`` / ``xset``."""
    if benchmark == "xsub":
        train = name.subject in XSUB60_TRAIN
    elif benchmark == "xsub120":
        train = name.subject in XSUB120_TRAIN
    elif benchmark == "xview":
        train = name.camera in (2, 3)
    elif benchmark == "xset":
        train = name.setup % 2 == 0
    else:
        raise ValueError(f"unknown benchmark {benchmark!r}")
    return "train" if train else "val"


@dataclass
class Skeleton:
    """One parsed file: ``num_frames`` and one entry per (frame, body) record, in file order."""
    num_frames: int
    frame: np.ndarray  # (E,) int64 frame index of each body record
    slot: np.ndarray  # (E,) int64 position of the body within its frame
    body_id: list  # (E,) bodyID tokens (strings: float() would lose their 17 digits)
    xyz: np.ndarray  # (E, 25, 3) float32 camera-space coordinates in metres


def _count(lines, i: int, path, what: str) -> int:
    if i >= len(lines):
        raise DataFormatError(path, f"file ends early (truncated?): expected {what} on line {i + 1}", i + 1)
    tokens = lines[i].split()
    if len(tokens) != 1:
        raise DataFormatError(path, f"expected {what} (one integer), found {len(tokens)} values", i + 1)
    try:
        value = int(tokens[0])
    except ValueError:
        raise DataFormatError(path, f"expected {what} (an integer), found {quote(tokens[0])}", i + 1) from None
    if value < 0:
        raise DataFormatError(path, f"expected {what} >= 0, found {value}", i + 1)
    return value


def read_skeleton(path: str | os.PathLike) -> Skeleton:
    """Parse one NTU ``.skeleton`` file (format in docs/DESIGN.md 1.1)."""
    lines = read_file(path).splitlines()
    if not any(line.strip() for line in lines):
        raise DataFormatError(path, "empty file: expected the frame count on line 1", 1)
    num_frames = _count(lines, 0, path, "the frame count")
    i, frame, slot, body_id, starts = 1, [], [], [], []
    for f in range(num_frames):
        num_bodies = _count(lines, i, path, f"the body count of frame {f + 1}")
        i += 1
        for b in range(num_bodies):
            if i >= len(lines):
                raise DataFormatError(path, f"file ends early (truncated?): expected the info line of body {b + 1} "
                                      f"in frame {f + 1} on line {i + 1}", i + 1)
            info = lines[i].split()
            if len(info) != 10:
                raise DataFormatError(path, f"expected the 10-value info line of body {b + 1} in frame {f + 1}, "
                                      f"found {len(info)} values", i + 1)
            for t in info[1:]:
                try:
                    float(t)
                except ValueError:
                    raise DataFormatError(path, f"non-numeric token {quote(t)} on the info line of body {b + 1} in "
                                          f"frame {f + 1}", i + 1) from None
            joints = _count(lines, i + 1, path, f"the joint count of body {b + 1} in frame {f + 1}")
            if joints != NUM_JOINTS:
                raise DataFormatError(path, f"wrong joint count: expected {NUM_JOINTS} joints, found {joints}", i + 2)
            if i + 2 + NUM_JOINTS > len(lines):
                raise DataFormatError(path, f"file ends early (truncated?): body {b + 1} of frame {f + 1} needs "
                                      f"{NUM_JOINTS} joint lines from line {i + 3}, the file has {len(lines)} lines",
                                      len(lines))
            frame.append(f)
            slot.append(b)
            body_id.append(info[0].decode(errors="replace"))
            starts.append(i + 2)
            i += 2 + NUM_JOINTS
    for j in range(i, len(lines)):
        if lines[j].strip():
            raise DataFormatError(path, f"unexpected content after the last of {num_frames} frames", j + 1)
    xyz = _joint_values(lines, starts, path)
    return Skeleton(num_frames, np.asarray(frame, np.int64), np.asarray(slot, np.int64), body_id, xyz)


def _joint_values(lines, starts, path) -> np.ndarray:
    """All joint lines, 12 numbers each, parsed in one go; only x, y, z are kept (and must be finite as the
    float32 they are stored in: 1e39 is a finite float64 but not a float32)."""
    if not starts:
        return np.zeros((0, NUM_JOINTS, 3), np.float32)
    rows = [lines[s + j] for s in starts for j in range(NUM_JOINTS)]
    tokens = b" ".join(rows).split()
    try:
        values = None if len(tokens) != 12 * len(rows) else np.array(tokens, dtype=np.float64)
    except ValueError:
        values = None
    if values is None:  # find the offending line (slow path, errors only)
        for k, row in enumerate(rows):
            line = starts[k // NUM_JOINTS] + k % NUM_JOINTS + 1
            parts = row.split()
            if len(parts) != 12:
                raise DataFormatError(path, f"expected 12 values on joint line (x y z depthX depthY colorX colorY "
                                      f"orientationWXYZ trackingState), found {len(parts)}", line)
            for t in parts:
                try:
                    float(t)
                except ValueError:
                    raise DataFormatError(path, f"non-numeric token {quote(t)} on a joint line", line) from None
        raise AssertionError("unreachable")
    xyz = values.reshape(len(starts), NUM_JOINTS, 12)[:, :, :3]
    with np.errstate(over="ignore"):
        xyz32 = xyz.astype(np.float32)
    bad = ~np.isfinite(xyz32)
    if bad.any():
        e, j, _ = np.argwhere(bad)[0]
        raise DataFormatError(path, f"non-finite coordinate ({xyz[e, j][bad[e, j]][0]}) on a joint line: x, y, z "
                              "must be finite float32 numbers (magnitude below 3.4e38)", starts[e] + j + 1)
    return xyz32


def select_bodies(sk: Skeleton, rule: str = "tracked", max_bodies: int = 2) -> np.ndarray:
    """Raw ``(3, num_frames, 25, max_bodies)`` float32 array (absent bodies zero).

    ``official``: body ``m`` of each frame (file order) goes to slot ``m``; later bodies are dropped, and
    identities can swap between frames (``read_xyz`` of the official code).
    ``tracked``: records are grouped by bodyID; the ``max_bodies`` bodies with the largest motion (sum over
    joints and axes of the coordinate variance over their frames) are kept, in order of first appearance.
    Spurious detections (objects, flickering fragments) are short or still, so they lose to the actors.
    """
    out = np.zeros((sk.num_frames, max_bodies, NUM_JOINTS, 3), np.float32)
    if rule == "official":
        keep = sk.slot < max_bodies
        out[sk.frame[keep], sk.slot[keep]] = sk.xyz[keep]
    elif rule == "tracked":
        ids = list(dict.fromkeys(sk.body_id))  # first-appearance order
        index = {b: k for k, b in enumerate(ids)}
        which = np.array([index[b] for b in sk.body_id], np.int64)
        motion = np.array([sk.xyz[which == k].var(axis=0).sum() if (which == k).sum() > 1 else 0.0
                           for k in range(len(ids))])
        chosen = sorted(np.argsort(-motion, kind="stable")[:max_bodies])
        for m, k in enumerate(chosen):
            rows = which == k
            out[sk.frame[rows], m] = sk.xyz[rows]
    else:
        raise ValueError(f"body selection must be 'official' or 'tracked'; got {rule!r}")
    return out.transpose(3, 0, 2, 1)  # (3, T, 25, M)


def read_xyz(path, rule: str = "tracked", max_bodies: int = 2) -> np.ndarray:
    return select_bodies(read_skeleton(path), rule, max_bodies)


def _ntu_task(job, options):
    sk = read_skeleton(job.payload)
    raw = select_bodies(sk, options["bodies"])
    if not has_body(raw, options["official"]):  # no body in any frame: a sample with missing skeletons
        return [(job.indices[0], None, None)]
    out = preprocess(raw, options["frames"], center=20, shoulders=(4, 8), official=options["official"])
    return [(job.indices[0], out, None)]


def prepare_ntu(raw_dirs, out, version: int = 60, frames: int = 64, bodies: str = "tracked",
                official: bool = False, ignore_list=None, skip_bad: bool = False, workers=None,
                progress: bool = True, force: bool = False):
    """Convert NTU RGB+D ``.skeleton`` files in ``raw_dirs`` to ``out/xsub`` and ``out/xview`` (NTU-60) or
    ``out/xsub`` and ``out/xset`` (NTU-120). NTU-60 takes the files of setups 1-17 and actions 1-60 (so an
    NTU-120 folder also works); files are sorted by name, as the official generator does."""
    if version not in (60, 120):
        raise ValueError(f"version must be 60 or 120; got {version}")
    if bodies not in ("tracked", "official"):
        raise ValueError(f"body selection must be 'tracked' or 'official'; got {bodies!r}")
    if isinstance(raw_dirs, (str, os.PathLike)):
        raw_dirs = [raw_dirs]
    paths, other = {}, 0
    for d in raw_dirs:
        for entry in os.scandir(require_dir(d, "NTU raw data (the .skeleton files)")):
            if entry.name.endswith(".skeleton"):
                paths[entry.name[: -len(".skeleton")]] = entry.path
            else:
                other += 1
    if not paths:
        raise FileNotFoundError(f"no .skeleton files in {', '.join(map(str, raw_dirs))}")
    if other:
        print(f"note: {other} files without the .skeleton extension were not read")
    ignore = read_ignore_list(ignore_list) if ignore_list else set()
    benchmarks = {"xsub": "xsub" if version == 60 else "xsub120", "xview": "xview", "xset": "xset"}
    candidates, jobs, ignored, bad = [], [], 0, []
    for stem in sorted(paths):
        try:
            name = parse_name(paths[stem])
        except DataFormatError as err:
            skip_or_raise(err, stem, bad, skip_bad)
            continue
        if version == 60 and (name.setup > 17 or name.action > 60):
            continue
        if stem in ignore:
            ignored += 1
            continue
        splits = {bm: split_of(name, benchmarks[bm]) for bm in BENCHMARKS[f"ntu{version}"]}
        jobs.append(Job(paths[stem], [len(candidates)], paths[stem]))
        candidates.append(Candidate(stem, name.label, splits))
    options = {"bodies": bodies, "frames": frames, "official": official}
    return build(out, Conversion(f"ntu{version}", "ntu-rgb+d", CLASSES[:version], frames, NUM_JOINTS, 2, candidates,
                                 jobs, _ntu_task, options, ignored=ignored, skipped=bad),
                 RunOptions(skip_bad, workers, progress, force))
