"""Property-based fuzzing of the raw-data readers with mutations of the real NTU and NW-UCLA files.

Every mutation (truncation, byte flips, inserted tokens, huge numbers, deleted, duplicated and swapped lines
or joints, deep nesting) must either prepare into finite float32 data or raise the package's
:class:`DataFormatError` naming the file, in one line: never another exception, never a hang (each case
runs under an alarm). Each case goes through the code a preparation worker runs for one file (the parse,
the body selection, the preprocessing and the float32 check); a few cases run whole preparations.
Derandomized, so CI sees the same cases every run.
"""
import contextlib
import re
import signal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skelemix.data import ntu, nwucla, prepare
from skelemix.data.errors import DataFormatError
from skelemix.data.prepared import read_meta

pytestmark = pytest.mark.needs_data

LIMIT_S = 20  # per case; a real file takes milliseconds, so only a hang reaches this on a busy machine
FRAMES = 16
SETTINGS = dict(derandomize=True, database=None, deadline=None,  # the alarm is the time limit: a deadline
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # cannot stop a hang
NUMBER = re.compile(rb"-?[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?")
HUGE = (b"1e39", b"-3.5e38", b"3.4e38", b"1e400", b"-1e309", b"9" * 400, b"9" * 5000, b"99999999999999999999",
        b"nan", b"-inf", b"Infinity", b"NaN", b"1e-50", b"0", b"-1", b"25")
TOKENS = HUGE + (b"", b" ", b"\n", b"\r\n", b"\x00", b"\xff\xfe", b"\xc3", b"abc", b"-", b".", b"0x1p3", b"1_0",
                 b"[", b"]", b"{", b"}", b'"', b",", b":", b"null", b"true", b"[]", b"{}", b'"skeletons"',
                 b"[" * 100_000, b"[" * 50_000 + b"]" * 50_000, b"1 2 3 4 5 6 7 8 9 10 11 12")


class Hang(BaseException):  # not an OSError or Exception: no handler in the code under test can swallow it
    pass


@contextlib.contextmanager
def time_limit(seconds):
    def fire(signum, frame):
        raise Hang(f"no result after {seconds} s")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def mutate(data: bytes, draw, sep: bytes) -> bytes:
    """1 to 3 random edits of ``data``; ``sep`` separates the units that get deleted, duplicated, swapped
    (lines of an NTU file, joints of an NW-UCLA JSON file)."""
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("truncate", "flip", "insert", "number", "delete", "duplicate", "swap",
                                     "replace unit")))
        units = data.split(sep)
        if kind == "truncate":
            data = data[:draw(st.integers(0, len(data)))]
        elif kind == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
        elif kind == "insert":
            at = draw(st.integers(0, len(data)))
            data = data[:at] + draw(st.sampled_from(TOKENS)) + data[at:]
        elif kind == "number":
            spans = [m.span() for m in NUMBER.finditer(data)]
            if spans:
                start, stop = spans[draw(st.integers(0, len(spans) - 1))]
                data = data[:start] + draw(st.sampled_from(HUGE)) + data[stop:]
        elif kind in ("delete", "duplicate", "replace unit"):
            k = draw(st.integers(0, len(units) - 1))
            units[k:k + 1] = {"delete": [], "duplicate": [units[k]] * 2,
                              "replace unit": [draw(st.sampled_from(TOKENS))]}[kind]
            data = sep.join(units)
        elif kind == "swap":
            a, b = draw(st.integers(0, len(units) - 1)), draw(st.integers(0, len(units) - 1))
            units[a], units[b] = units[b], units[a]
            data = sep.join(units)
    return data


def prepare_one(task, options, path, shape):
    """What a preparation worker does for one file, under the time limit; asserts the outcome is finite data,
    a missing skeleton or a one-line DataFormatError naming the file."""
    prepare._init(task, options)
    with time_limit(LIMIT_S):
        [(_, arr, err)] = prepare._run(prepare.Job(str(path), [0], path))
    if err is not None:
        assert isinstance(err, DataFormatError) and err.path == str(path), repr(err)
        assert "\n" not in str(err) and len(str(err)) < 1000, str(err)
        return "error"
    if arr is None:
        return "missing"
    assert arr.shape == shape and arr.dtype == np.float32 and np.isfinite(arr).all()
    return "data"


NTU_FILES = ("S001C001P001R001A001.skeleton", "S001C001P001R001A023.skeleton",  # LF; CRLF
             "S001C001P001R001A027.skeleton", "S001C001P001R001A050.skeleton")  # a noise body; two persons
UCLA_FILES = ("a01_s01_e00_v01.json", "a12_s10_e01_v03.json", "a08_s02_e01_v02.json")


def test_mutated_ntu_files_parse_or_raise_data_errors(shared_data, tmp_path):
    originals = {n: (shared_data / "ntu" / n).read_bytes() for n in NTU_FILES}
    path = tmp_path / NTU_FILES[0]
    outcomes = []

    @settings(max_examples=300, **SETTINGS)
    @given(st.data())
    def check(data):
        source = data.draw(st.sampled_from(NTU_FILES))
        path.write_bytes(mutate(originals[source], data.draw, b"\n"))
        options = {"bodies": data.draw(st.sampled_from(("tracked", "official"))), "frames": FRAMES,
                   "official": data.draw(st.booleans())}
        outcomes.append(prepare_one(ntu._ntu_task, options, path, (3, FRAMES, 25, 2)))

    check()
    assert {"error", "data"} <= set(outcomes), outcomes  # the mutations reach both outcomes


def test_mutated_nwucla_files_parse_or_raise_data_errors(shared_data, tmp_path):
    originals = {n: (shared_data / "nw-ucla" / "all_sqe" / n).read_bytes() for n in UCLA_FILES}
    path = tmp_path / UCLA_FILES[0]
    outcomes = []

    @settings(max_examples=300, **SETTINGS)
    @given(st.data())
    def check(data):
        source = data.draw(st.sampled_from(UCLA_FILES))
        path.write_bytes(mutate(originals[source], data.draw, data.draw(st.sampled_from((b"], [", b"]], [[")))))
        options = {"frames": FRAMES, "official": data.draw(st.booleans())}
        outcomes.append(prepare_one(nwucla._task, options, path, (3, FRAMES, 20, 1)))

    check()
    assert {"error", "data"} <= set(outcomes), outcomes


def _check_prepared(out, report, total):
    """The prepared folders hold finite data; every input is in a split, skipped or missing."""
    prepared = sum(n for sizes in report.sizes.values() for n in sizes.values())
    benchmarks = len(report.sizes)
    assert prepared + benchmarks * (len(report.skipped) + len(report.missing)) == benchmarks * total
    for bm in report.sizes:
        root = out if bm is None else out / bm
        meta = read_meta(root)
        assert meta["skipped"] == len(report.skipped)
        for split, n in meta["splits"].items():
            assert np.isfinite(np.load(root / f"{split}_data.npy")).all()
            assert len((root / f"{split}_names.txt").read_text().splitlines()) == n
        assert len((root / "skipped.txt").read_text().splitlines()) == len(report.skipped)


def test_whole_preparations_of_mutated_ntu_files_skip_exactly_the_bad_ones(shared_data, tmp_path):
    originals = [(shared_data / "ntu" / n).read_bytes() for n in NTU_FILES]
    runs = iter(range(10**6))

    @settings(max_examples=10, **SETTINGS)
    @given(st.data())
    def check(data):
        run = tmp_path / str(next(runs))
        raw = run / "raw"
        raw.mkdir(parents=True)
        for k, original in enumerate(originals):  # camera 2: train in xview, subject 1: train in xsub
            (raw / f"S001C002P001R001A{k + 1:03d}.skeleton").write_bytes(mutate(original, data.draw, b"\n"))
        with time_limit(4 * LIMIT_S):
            report = ntu.prepare_ntu(raw, run / "out", frames=FRAMES, skip_bad=True, workers=1, progress=False)
        _check_prepared(run / "out", report, len(originals))

    check()


def test_whole_preparations_of_mutated_nwucla_files_skip_exactly_the_bad_ones(shared_data, tmp_path):
    originals = {n: (shared_data / "nw-ucla" / "all_sqe" / n).read_bytes() for n in UCLA_FILES}
    runs = iter(range(10**6))

    @settings(max_examples=10, **SETTINGS)
    @given(st.data())
    def check(data):
        run = tmp_path / str(next(runs))
        raw = run / "raw"
        raw.mkdir(parents=True)
        for name, original in originals.items():
            (raw / name).write_bytes(mutate(original, data.draw, b"], ["))
        with time_limit(4 * LIMIT_S):
            report = nwucla.prepare_nwucla(raw, run / "out", frames=FRAMES, skip_bad=True, workers=1,
                                           progress=False)
        _check_prepared(run / "out", report, len(originals))

    check()

