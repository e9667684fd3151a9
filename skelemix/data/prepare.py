"""The conversion engine every raw-dataset converter shares: parallel, resumable, atomic, bounded memory.

A converter lists its *candidates* (one per output sample: name, label, split under each benchmark) and
its *jobs* (units of parallel work, e.g. one file, each producing some candidates), then calls
:func:`build` with them (a :class:`Conversion`). Jobs run in a process pool (``imap_unordered``, chunked)
with a progress bar; every finished sample goes straight into a memory-mapped cache
``<out>.work/samples.npy`` and its status into ``status.npy``, both flushed regularly, so memory stays at a
few samples and an interrupted run resumes where it stopped. Each benchmark's prepared dataset (format in
:mod:`.prepared`) is then copied out of the cache in chunks into a temporary folder, which is renamed into
place when complete; the cache is removed at the end.

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


@dataclass
class Conversion:
    """What a converter prepares: the dataset's name, skeleton and sizes, one candidate per output sample, the
    jobs that produce them and the ``task(job, options)`` that runs a job (see :func:`build`)."""

    dataset: str
    layout: str | dict
    classes: list
    frames: int
    joints: int
    bodies: int
    candidates: list[Candidate]
    jobs: list[Job]
    task: Callable
    options: dict  # the task's settings (part of what identifies a prepared dataset)
    channels: int = 3
    split_names: tuple = ("train", "val")  # every benchmark gets these splits, even if empty
    extra_meta: dict = field(default_factory=dict)
    ignored: int = 0  # inputs on the ignore list
    skipped: list = field(default_factory=list)  # (name, error) of inputs the converter already left out

    def settings(self) -> str:
        return _fingerprint({"dataset": self.dataset, "frames": self.frames, "options": self.options})


@dataclass
class RunOptions:
    """How :func:`build` runs: ``skip_bad`` leaves malformed inputs out (listed in ``skipped.txt``) instead of
    stopping; ``workers`` processes (None: all cores); ``force`` redoes benchmarks already prepared."""

    skip_bad: bool = False
    workers: int | None = None
    progress: bool = True
    force: bool = False


def build(out, conversion: Conversion, run: RunOptions = RunOptions()) -> Report:
    """Run ``task(job, options) -> [(index, (channels, frames, joints, bodies) array or None if no body, error)]``
    over the jobs and write one prepared dataset per benchmark: ``out/<benchmark>/`` or, when every
    candidate's benchmark is ``None``, ``out/`` itself. Every benchmark gets the ``split_names`` and any other
    split its candidates name."""
    out, c = Path(out), conversion
    _check(out, c, run)
    report = Report(out, ignored=c.ignored)
    benchmarks = list(dict.fromkeys(bm for cand in c.candidates for bm in cand.splits))
    finals = {bm: out if bm is None else out / bm for bm in benchmarks}
    todo = [bm for bm, final in finals.items() if not _reuse(final, bm, c, run.force, report)]
    if not todo:
        return report
    cache = _Cache(out.with_name(out.name + ".work"), c, run.skip_bad)
    try:
        _parse(cache, c, run)
    finally:
        cache.flush()
    report.missing = [c.candidates[i].name for i in np.flatnonzero(cache.status == MISSING)]
    report.skipped = list(c.skipped) + [(c.candidates[i].name, cache.errors.get(int(i), ""))
                                        for i in np.flatnonzero(cache.status == BAD)]
    for bm in todo:
        report.sizes[bm] = _write_benchmark(finals[bm], bm, cache, c, report)
    cache.remove()
    return report


def _check(out: Path, c: Conversion, run: RunOptions) -> None:
    """The arguments, and every name that will become a file name or a line (names from data files are
    untrusted), before anything is written or removed."""
    if isinstance(c.frames, bool) or not isinstance(c.frames, (int, np.integer)) or c.frames < 1:
        raise ValueError(f"frames must be a whole number >= 1; got {c.frames!r}")
    workers = run.workers
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, (int, np.integer))
                                or workers < 1):
        raise ValueError(f"workers must be a whole number >= 1 (or None: all cores); got {workers!r}")
    for job in c.jobs:
        for i in job.indices:
            check_name(c.candidates[i].name, job.key, "sample name")
            for bm, split in c.candidates[i].splits.items():
                check_name(split, job.key, "split name")
                if bm is not None:
                    check_name(bm, job.key, "benchmark name")
    if not c.candidates:
        raise FileNotFoundError(f"nothing to prepare into {out}: no sample is left ({c.ignored} on the ignore list, "
                                f"{len(c.skipped)} skipped as bad)")


def _reuse(final: Path, bm, c: Conversion, force: bool, report: Report) -> bool:
    """Whether the benchmark ``bm`` is already prepared in ``final`` with the same settings (then it is kept and
    reported); another dataset or a foreign folder there is an error."""
    meta_path = final / "meta.json"
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") != c.settings():
            raise FileExistsError(f"{final} is a dataset prepared with other settings; pass --force to "
                                  "replace it or choose another --out")
        report.reused.append(bm)
        report.sizes[bm] = meta["splits"]
        return True
    if final.exists() and not meta_path.is_file() and any(final.iterdir()):
        raise FileExistsError(f"{final} exists and is not a prepared dataset; choose another --out")
    return False


class _Cache:
    """The resumable work folder: every parsed sample in a memory map ``samples.npy``, its status in
    ``status.npy`` and the errors of bad ones in ``errors.jsonl``; started anew when the conversion differs."""

    def __init__(self, work: Path, c: Conversion, skip_bad: bool):
        self.work = work
        state = {"settings": c.settings(), "candidates": _fingerprint([cand.name for cand in c.candidates]),
                 "shape": [len(c.candidates), c.channels, c.frames, c.joints, c.bodies]}
        state_path = work / "state.json"
        if not (state_path.is_file() and json.loads(state_path.read_text()) == state):
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            open_memmap(work / "samples.npy", "w+", np.float32, tuple(state["shape"])).flush()
            np.save(work / "status.npy", np.zeros(len(c.candidates), np.int8))
            state_path.write_text(json.dumps(state))
        self.samples = open_memmap(work / "samples.npy", "r+")
        self.status = open_memmap(work / "status.npy", "r+")
        if not skip_bad:  # inputs an earlier --skip-bad run left out are parsed again, so their errors surface
            self.status[self.status == BAD] = PENDING
        self.errors_path = work / "errors.jsonl"
        self.errors = {}
        if self.errors_path.is_file():
            for line in self.errors_path.read_text().splitlines():
                i, msg = json.loads(line)
                self.errors[i] = msg

    def store(self, i: int, arr, err, skip_bad: bool) -> None:
        """One job result: a sample, a sample without a body, or an error (raised unless ``skip_bad``)."""
        if err is not None:
            if not skip_bad:
                err.skippable = True
                raise err
            self.status[i], self.errors[i] = BAD, str(err)
            with open(self.errors_path, "a") as f:
                f.write(json.dumps([i, str(err)]) + "\n")
        elif arr is None:
            self.status[i] = MISSING
        else:
            self.samples[i] = arr
            self.status[i] = OK

    def flush(self) -> None:
        self.samples.flush()  # data before status: a flushed status never points at unwritten data
        self.status.flush()

    def remove(self) -> None:
        self.samples = self.status = None  # close the memory maps before removing the cache
        shutil.rmtree(self.work, ignore_errors=True)


def _parse(cache: _Cache, c: Conversion, run: RunOptions) -> None:
    """The pending jobs in a process pool (or in this process), their results into the cache as they come."""
    pending = [job for job in c.jobs if (cache.status[job.indices] == PENDING).any()]
    done = len(c.candidates) - sum(len(job.indices) for job in pending)
    workers = (os.cpu_count() or 1) if run.workers is None else run.workers
    since_flush, pool = 0, None
    with tqdm(total=len(c.candidates), initial=done, desc=f"{c.dataset}: parsing", unit="sample",
              disable=not run.progress, dynamic_ncols=True) as bar:
        try:
            if workers > 1 and len(pending) > 1:
                pool = get_context("fork" if os.name == "posix" else "spawn").Pool(
                    min(workers, len(pending)), initializer=_init, initargs=(c.task, c.options, True))
                results = pool.imap_unordered(_run, pending,
                                              chunksize=max(1, min(32, len(pending) // (4 * workers))))
            else:
                _init(c.task, c.options)
                results = map(_run, pending)
            for result in results:
                for i, arr, err in result:
                    cache.store(i, arr, err, run.skip_bad)
                since_flush += len(result)
                bar.update(len(result))
                if since_flush >= _FLUSH_EVERY:
                    cache.flush()
                    since_flush = 0
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()


def _write_benchmark(final: Path, bm, cache: _Cache, c: Conversion, report: Report) -> dict:
    """Copy one benchmark's splits out of the cache into a temporary folder, then rename it into ``final``.
    Returns the split sizes."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ok = np.flatnonzero(cache.status == OK)
    sizes = {}
    for split in dict.fromkeys([*c.split_names, *(cand.splits[bm] for cand in c.candidates if bm in cand.splits)]):
        idx = np.array([i for i in ok if c.candidates[i].splits.get(bm) == split], np.int64)
        arr = open_memmap(tmp / f"{split}_data.npy", "w+", np.float32, (len(idx), c.channels, c.frames, c.joints,
                                                                        c.bodies))
        for s in range(0, len(idx), _COPY_CHUNK):
            arr[s:s + _COPY_CHUNK] = cache.samples[idx[s:s + _COPY_CHUNK]]
        arr.flush()
        del arr
        np.save(tmp / f"{split}_label.npy", np.array([c.candidates[i].label for i in idx], np.int64))
        (tmp / f"{split}_names.txt").write_text("".join(f"{c.candidates[i].name}\n" for i in idx))
        sizes[split] = len(idx)
    in_bm = {cand.name for cand in c.candidates if bm in cand.splits}
    everywhere = {n for n, _ in c.skipped}  # not a candidate: listed under every benchmark
    missing = [n for n in report.missing if n in in_bm]
    bad = [(n, e) for n, e in report.skipped if n in in_bm or n in everywhere]
    (tmp / "missing_skeletons.txt").write_text("".join(f"{n}\n" for n in missing))
    (tmp / "skipped.txt").write_text("".join(f"{printable(n)}\t{e}\n" for n, e in bad))
    write_meta(tmp, dataset=c.dataset, layout=c.layout, classes=list(c.classes), frames=c.frames, bodies=c.bodies,
               splits=sizes, benchmark=bm, settings=c.settings(), options=c.options,
               missing_skeletons=len(missing), skipped=len(bad), **c.extra_meta)
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    return sizes


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
