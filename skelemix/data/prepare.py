"""The conversion engine every raw-dataset converter shares: parallel, resumable, atomic, bounded memory.

A converter lists its *candidates* (one per output sample: name, label, split under each benchmark) and
its *jobs* (units of parallel work, e.g. one file, each producing some candidates), then calls
:func:`build`. Jobs run in a process pool (``imap_unordered``, chunked) with a progress bar; every finished
sample goes straight into a memory-mapped cache ``<out>.work/samples.npy`` and its status into
``status.npy``, both flushed regularly, so memory stays at a few samples and an interrupted run resumes
where it stopped. Each benchmark's prepared dataset (format in :mod:`.prepared`) is then copied out of the
cache in chunks into a temporary folder, which is renamed into place when complete; the cache is removed
at the end.

Samples in which no body appears are listed as missing skeletons and left out. A malformed input raises
:class:`DataFormatError` (file, line, expectation) unless ``skip_bad``, which leaves the sample out and
lists it with its error in ``skipped.txt``. Inputs are untrusted: raw files are read only when they are
regular files (:func:`read_file`: a FIFO would block forever), every name that becomes a file name or a
line is checked (:func:`~.errors.check_name`), and a sample that is not finite once stored as float32 is
refused like a malformed file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from .errors import DataFormatError, check_name, printable
from .prepared import write_meta

PENDING, OK, MISSING, BAD = 0, 1, 2, 3
_FLUSH_EVERY = 512  # samples between flushes of the cache (what a crash can lose)
_COPY_CHUNK = 1024  # samples per copy from the cache into a split (bounds memory)


@dataclass
class Candidate:
    name: str
    label: int
    splits: dict[str | None, str]  # benchmark (None: the dataset has one) -> split name


@dataclass
class Job:
    key: str  # what the progress bar and errors call it (usually a file)
    indices: list[int]  # candidates it produces
    payload: Any = None  # picklable arguments for the task


@dataclass
class Report:
    out: Path
    sizes: dict = field(default_factory=dict)  # benchmark -> {split: N}
    missing: list = field(default_factory=list)  # names without any body
    skipped: list = field(default_factory=list)  # (name, error) with skip_bad
    ignored: int = 0
    reused: list = field(default_factory=list)  # benchmarks already prepared, left untouched

    def summary(self) -> str:
        parts = [f"{bm or 'splits'}: " + ", ".join(f"{s} {n}" for s, n in sizes.items())
                 for bm, sizes in self.sizes.items()]
        lines = [f"{printable(str(self.out))}: " + "; ".join(parts)]
        if self.ignored:
            lines.append(f"ignored (ignore list): {self.ignored}")
        if self.missing:
            lines.append(f"missing skeletons (no body in any frame), left out: {len(self.missing)}: "
                         + ", ".join(self.missing[:10]) + (" ..." if len(self.missing) > 10 else ""))
        if self.skipped:
            lines.append(f"skipped bad inputs (--skip-bad): {len(self.skipped)}")
            lines += [f"  {printable(name)}: {err}" for name, err in self.skipped]
        if self.reused:
            lines.append(f"already prepared, kept: {', '.join(str(b) for b in self.reused)} (--force to redo)")
        return "\n".join(lines)


_TASK: Callable | None = None
_OPTIONS: dict = {}


def _init(task, options, worker=False):
    global _TASK, _OPTIONS
    _TASK, _OPTIONS = task, options
    if worker:  # Ctrl-C is the main process's to handle: it saves the progress and stops the pool
        signal.signal(signal.SIGINT, signal.SIG_IGN)


_NOT_FINITE = ("non-finite values in the prepared sample: a coordinate (or a difference of two) is beyond the "
               "float32 range of about 3.4e38; expected finite coordinates in metres")


def _run(job: Job):
    """Run one job in a worker: ``[(index, array | None, error | None)]``; format errors become results, and
    so does a sample that is not finite once cast to float32, the dtype it is stored in."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, as a data error
        try:
            results = _TASK(job, _OPTIONS)
        except DataFormatError as err:
            return [(i, None, err) for i in job.indices]
        checked = []
        for k, (i, arr, err) in enumerate(results):
            if arr is not None:
                arr = np.asarray(arr, np.float32)
                if not np.isfinite(arr).all():
                    which = f"sample {k + 1} of {len(results)}: " if len(results) > 1 else ""
                    arr, err = None, DataFormatError(job.key, which + _NOT_FINITE)
            checked.append((i, arr, err))
    return checked


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build(out, *, dataset: str, layout: str, classes, frames: int, joints: int, bodies: int,
          candidates: list[Candidate], jobs: list[Job], task: Callable, options: dict, skip_bad: bool = False,
          workers: int | None = None, progress: bool = True, force: bool = False, extra_meta: dict | None = None,
          ignored: int = 0, skipped: list | None = None, split_names=("train", "val"), channels: int = 3) -> Report:
    """Run ``task(job, options) -> [(index, (channels, frames, joints, bodies) array or None if no body, error)]``
    over ``jobs`` and write one prepared dataset per benchmark: ``out/<benchmark>/`` or, when every
    candidate's benchmark is ``None``, ``out/`` itself. ``skipped``: ``(name, error)`` of inputs the
    converter already left out (reported with the others). Every benchmark gets the ``split_names`` (even
    if empty) and any other split its candidates name."""
    out = Path(out)
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
        raise ValueError(f"frames must be a whole number >= 1; got {frames!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, (int, np.integer))
                                or workers < 1):
        raise ValueError(f"workers must be a whole number >= 1 (or None: all cores); got {workers!r}")
    for job in jobs:  # before anything is written or removed: names from data files are untrusted
        for i in job.indices:
            check_name(candidates[i].name, job.key, "sample name")
            for bm, split in candidates[i].splits.items():
                check_name(split, job.key, "split name")
                if bm is not None:
                    check_name(bm, job.key, "benchmark name")
    if not candidates:
        raise FileNotFoundError(f"nothing to prepare into {out}: no sample is left ({ignored} on the ignore list, "
                                f"{len(skipped or [])} skipped as bad)")
    benchmarks = list(dict.fromkeys(bm for c in candidates for bm in c.splits))
    finals = {bm: out if bm is None else out / bm for bm in benchmarks}
    settings = {"dataset": dataset, "frames": frames, "options": options}
    report = Report(out, ignored=ignored)
    todo = []
    for bm, final in finals.items():
        meta_path = final / "meta.json"
        if meta_path.is_file() and not force:
            meta = json.loads(meta_path.read_text())
            if meta.get("settings") != _fingerprint(settings):
                raise FileExistsError(f"{final} is a dataset prepared with other settings; pass --force to "
                                      "replace it or choose another --out")
            report.reused.append(bm)
            report.sizes[bm] = meta["splits"]
        else:
            if final.exists() and not meta_path.is_file() and any(final.iterdir()):
                raise FileExistsError(f"{final} exists and is not a prepared dataset; choose another --out")
            todo.append(bm)
    if not todo:
        return report

    work = out.with_name(out.name + ".work")
    state = {"settings": _fingerprint(settings), "candidates": _fingerprint([c.name for c in candidates]),
             "shape": [len(candidates), channels, frames, joints, bodies]}
    state_path = work / "state.json"
    if not (state_path.is_file() and json.loads(state_path.read_text()) == state):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        open_memmap(work / "samples.npy", "w+", np.float32, tuple(state["shape"])).flush()
        np.save(work / "status.npy", np.zeros(len(candidates), np.int8))
        state_path.write_text(json.dumps(state))
    samples = open_memmap(work / "samples.npy", "r+")
    status = open_memmap(work / "status.npy", "r+")
    if not skip_bad:  # inputs an earlier --skip-bad run left out are parsed again, so their errors surface
        status[status == BAD] = PENDING
    errors_path = work / "errors.jsonl"
    errors = {}
    if errors_path.is_file():
        for line in errors_path.read_text().splitlines():
            i, msg = json.loads(line)
            errors[i] = msg
    pending = [job for job in jobs if (status[job.indices] == PENDING).any()]
    done = len(candidates) - sum(len(job.indices) for job in pending)
    workers = (os.cpu_count() or 1) if workers is None else workers
    bar = tqdm(total=len(candidates), initial=done, desc=f"{dataset}: parsing", unit="sample", disable=not progress,
               dynamic_ncols=True)
    since_flush = 0

    def flush():
        samples.flush()  # data before status: a flushed status never points at unwritten data
        status.flush()

    try:
        if workers > 1 and len(pending) > 1:
            pool = get_context("fork" if os.name == "posix" else "spawn").Pool(
                min(workers, len(pending)), initializer=_init, initargs=(task, options, True))
            results = pool.imap_unordered(_run, pending, chunksize=max(1, min(32, len(pending) // (4 * workers))))
        else:
            pool = None
            _init(task, options)
            results = map(_run, pending)
        try:
            for result in results:
                for i, arr, err in result:
                    if err is not None:
                        if not skip_bad:
                            err.skippable = True
                            raise err
                        status[i], errors[i] = BAD, str(err)
                        with open(errors_path, "a") as f:
                            f.write(json.dumps([i, str(err)]) + "\n")
                    elif arr is None:
                        status[i] = MISSING
                    else:
                        samples[i] = arr
                        status[i] = OK
                    since_flush += 1
                bar.update(len(result))
                if since_flush >= _FLUSH_EVERY:
                    flush()
                    since_flush = 0
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    finally:
        flush()
        bar.close()

    report.missing = [candidates[i].name for i in np.flatnonzero(status == MISSING)]
    report.skipped = list(skipped or []) + [(candidates[i].name, errors.get(int(i), ""))
                                            for i in np.flatnonzero(status == BAD)]
    everywhere = {n for n, _ in skipped or []}  # not a candidate: listed under every benchmark
    ok = np.flatnonzero(status == OK)
    for bm in todo:
        final = finals[bm]
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        sizes = {}
        names = list(dict.fromkeys([*split_names, *(c.splits[bm] for c in candidates if bm in c.splits)]))
        for split in names:
            idx = np.array([i for i in ok if candidates[i].splits.get(bm) == split], np.int64)
            arr = open_memmap(tmp / f"{split}_data.npy", "w+", np.float32, (len(idx), channels, frames, joints,
                                                                            bodies))
            for s in range(0, len(idx), _COPY_CHUNK):
                arr[s:s + _COPY_CHUNK] = samples[idx[s:s + _COPY_CHUNK]]
            arr.flush()
            del arr
            np.save(tmp / f"{split}_label.npy", np.array([candidates[i].label for i in idx], np.int64))
            (tmp / f"{split}_names.txt").write_text("".join(f"{candidates[i].name}\n" for i in idx))
            sizes[split] = len(idx)
        in_bm = {c.name for c in candidates if bm in c.splits}
        missing = [n for n in report.missing if n in in_bm]
        bad = [(n, e) for n, e in report.skipped if n in in_bm or n in everywhere]
        (tmp / "missing_skeletons.txt").write_text("".join(f"{n}\n" for n in missing))
        (tmp / "skipped.txt").write_text("".join(f"{printable(n)}\t{e}\n" for n, e in bad))
        write_meta(tmp, dataset=dataset, layout=layout, classes=list(classes), frames=frames, bodies=bodies,
                   splits=sizes, benchmark=bm, settings=_fingerprint(settings), options=options,
                   missing_skeletons=len(missing), skipped=len(bad), **(extra_meta or {}))
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        report.sizes[bm] = sizes
    samples = status = None  # close the memory maps before removing the cache
    shutil.rmtree(work, ignore_errors=True)
    return report


def skip_or_raise(err: DataFormatError, name: str, skipped: list, skip_bad: bool) -> None:
    """Leave one bad input out (``skipped`` gets its name and error) under ``skip_bad``; raise ``err``
    otherwise, marked as one that ``skip_bad`` would have left out."""
    if not skip_bad:
        err.skippable = True
        raise err
    skipped.append((name, str(err)))


def read_file(path) -> bytes:
    """The bytes of the regular file at ``path``. Anything else raises :class:`DataFormatError`, which
    ``skip_bad`` can skip: a directory, a FIFO (opened without blocking, so it cannot hang the run), a
    device, a file that cannot be opened or read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise DataFormatError(path, f"cannot open the file: {err.strerror or err}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "another kind of file")
            raise DataFormatError(path, f"expected a regular file, found {kind}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as err:
        raise DataFormatError(path, f"cannot read the file: {err.strerror or err}") from None
    finally:
        os.close(fd)


def read_text(path) -> str:
    """:func:`read_file` decoded as UTF-8 (a BOM is allowed)."""
    try:
        return read_file(path).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(path, f"not UTF-8 text (byte offset {err.start}: {err.reason})") from None


def read_ignore_list(path) -> set[str]:
    """Names in an ignore list (one per line, with or without an extension; blank lines and # comments skipped)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ignore list {path} not found")
    names = set()
    for line in read_text(path).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(Path(line).name.split(".", 1)[0])
    return names


def require_dir(path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: directory {path} not found" if not path.exists()
                                else f"{what}: {path} is not a directory")
    return path
