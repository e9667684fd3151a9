"""NTU RGB+D: parsing the genuine .skeleton files, every malformed variant (made here from a real file) with
its own error, split rules, body selection and the resumable, atomic preparation."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from skelemix.data import PreparedDataset
from skelemix.data import ntu
from skelemix.data.__main__ import main
from skelemix.data.errors import DataFormatError, check_name
from skelemix.data.ntu import parse_name, prepare_ntu, read_skeleton, read_xyz, select_bodies, split_of

pytestmark = pytest.mark.needs_data

# Frame counts of the shared samples (first line of each file); A050-A060 are two-person interactions.
FRAMES = {1: 103, 8: 71, 23: 67, 27: 87, 43: 85, 50: 74, 55: 95, 58: 71, 60: 93}
TWO_PERSON = (50, 55, 58, 60)
ONE = "S001C001P001R001A001.skeleton"


@pytest.fixture
def ntu_dir(shared_data):
    return shared_data / "ntu"


def _lines(path):
    return path.read_bytes().decode().splitlines()


def _write(path, lines, eol="\n"):
    path.write_text(eol.join(lines) + eol)
    return path


def test_real_files_parse_to_their_frame_counts_and_shapes(ntu_dir):
    for action, frames in FRAMES.items():
        path = ntu_dir / f"S001C001P001R001A{action:03d}.skeleton"
        sk = read_skeleton(path)
        assert sk.num_frames == frames
        per_frame = np.bincount(sk.frame, minlength=frames)
        expected_bodies = 2 if action in TWO_PERSON or action == 27 else 1  # A027 carries a noise body
        assert (per_frame == expected_bodies).all(), action
        assert len(set(sk.body_id)) == expected_bodies
        for rule in ("official", "tracked"):
            x = read_xyz(path, rule)
            assert x.shape == (3, frames, 25, 2) and x.dtype == np.float32
            assert (np.abs(x[..., 0]).sum(axis=(0, 2)) > 0).all()
            assert ((np.abs(x[..., 1]).sum(axis=(0, 2)) > 0).all() if expected_bodies == 2
                    else np.abs(x[..., 1]).max() == 0)
    x = read_xyz(ntu_dir / ONE)  # the first joint line of the file: 0.2181153 0.1725972 3.785547
    np.testing.assert_array_equal(x[:, 0, 0, 0], np.float32([0.2181153, 0.1725972, 3.785547]))


def test_crlf_and_lf_give_the_same_arrays(ntu_dir, tmp_path):
    crlf = ntu_dir / "S001C001P001R001A023.skeleton"
    assert b"\r\n" in crlf.read_bytes()  # as published
    lf = _write(tmp_path / crlf.name, _lines(crlf))
    np.testing.assert_array_equal(read_xyz(crlf), read_xyz(lf))
    (tmp_path / "crlf").mkdir()
    crlf_copy = _write(tmp_path / "crlf" / ONE, _lines(ntu_dir / ONE), "\r\n")  # an LF file turned CRLF
    np.testing.assert_array_equal(read_xyz(crlf_copy), read_xyz(ntu_dir / ONE))


def _frame_blocks(lines):
    """[(body-count line, [27-line body blocks])] of a well-formed file's lines."""
    i, frames = 1, []
    for _ in range(int(lines[0])):
        n = int(lines[i])
        frames.append((lines[i], [lines[i + 1 + 27 * b: i + 1 + 27 * (b + 1)] for b in range(n)]))
        i += 1 + 27 * n
    return frames


def test_tracking_undoes_identity_swaps_that_the_official_rule_keeps(ntu_dir, tmp_path):
    path = ntu_dir / "S001C001P001R001A050.skeleton"
    lines = _lines(path)
    out = [lines[0]]
    for f, (head, bodies) in enumerate(_frame_blocks(lines)):
        out.append(head)
        for block in (bodies[::-1] if f % 2 else bodies):  # the bodies listed in the other order every 2nd frame
            out += block
    swapped = _write(tmp_path / path.name, out)
    original = read_xyz(path, "official")
    official = read_xyz(swapped, "official")
    np.testing.assert_array_equal(official[:, 1::2], original[:, 1::2, :, ::-1])  # identities swap
    np.testing.assert_array_equal(read_xyz(swapped, "tracked"), read_xyz(path, "tracked"))


def test_tracked_keeps_the_two_most_active_of_three_bodies():
    # Three bodies in every frame: a still one listed first, then two moving ones.
    T = 5
    t = np.arange(T, dtype=np.float32)[:, None, None]
    still = np.ones((T, 25, 3), np.float32)
    a, b = still + t * 0.1, still - t * 0.2
    sk = ntu.Skeleton(T, np.repeat(np.arange(T), 3), np.tile(np.arange(3), T), ["still", "a", "b"] * T,
                      np.stack([still, a, b], 1).reshape(3 * T, 25, 3))
    x = select_bodies(sk, "tracked")
    np.testing.assert_array_equal(x[..., 0], a.transpose(2, 0, 1))
    np.testing.assert_array_equal(x[..., 1], b.transpose(2, 0, 1))
    np.testing.assert_array_equal(select_bodies(sk, "official")[..., 0], still.transpose(2, 0, 1))


# Each malformed variant, made from the real A001 file (line numbers are 1-based, as an editor shows them).
def _variant(lines, kind):
    lines = list(lines)
    if kind == "truncated":
        return lines[:1000], r":1000: file ends early \(truncated\?\)"
    if kind == "non-numeric":
        parts = lines[5].split()
        parts[1] = "0.4326x36"
        lines[5] = " ".join(parts)
        return lines, r":6: non-numeric token '0.4326x36' on a joint line"
    if kind == "non-numeric info":
        lines[2] = lines[2].replace(" 0 1 1 1 1 0 ", " 0 1 one 1 1 0 ")
        return lines, r":3: non-numeric token 'one' on the info line of body 1 in frame 1"
    if kind == "joint count":
        lines[3] = "24"
        return lines, r":4: wrong joint count: expected 25 joints, found 24"
    if kind in ("nan", "inf", "1e39"):  # 1e39 is a finite float64 but inf as the float32 that is stored
        parts = lines[32].split()  # frame 2, joint 1
        parts[2] = kind
        lines[32] = " ".join(parts)
        return lines, r":33: non-finite coordinate \(" + {"1e39": r"1e\+39"}.get(kind, kind) + r"\)"
    if kind == "missing joint line":
        del lines[10]
        return lines, r":30: expected the body count of frame 2 \(one integer\), found 10 values"
    if kind == "short joint line":
        lines[7] = " ".join(lines[7].split()[:11])
        return lines, r":8: expected 12 values on joint line .*found 11"
    if kind == "empty":
        return [], r":1: empty file: expected the frame count on line 1"
    if kind == "trailing garbage":
        return lines + ["1 2 3"], r":2886: unexpected content after the last of 103 frames"
    raise AssertionError(kind)


KINDS = ("truncated", "non-numeric", "non-numeric info", "joint count", "nan", "inf", "1e39", "missing joint line",
         "short joint line", "empty", "trailing garbage")


@pytest.mark.parametrize("kind", KINDS)
def test_each_malformed_variant_names_file_line_and_expectation(ntu_dir, tmp_path, kind):
    lines, message = _variant(_lines(ntu_dir / ONE), kind)
    path = tmp_path / ONE
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(DataFormatError, match=ONE.replace(".", r"\.") + ".*" + message.lstrip(":")) as err:
        read_skeleton(path)
    assert err.value.path == str(path)
    if message.startswith(":"):
        assert err.value.line == int(message[1:].split(":")[0])


def test_file_names_directories_and_split_rules(tmp_path):
    name = parse_name("S017C003P038R002A060.skeleton")
    assert (name.setup, name.camera, name.subject, name.replication, name.action, name.label) == (17, 3, 38, 2, 60, 59)
    for bad in ("S01C001P001R001A001.skeleton", "foo.skeleton", "s001c001p001r001a001.skeleton",
                "S001C001P001R001A001\n.skeleton", "S001C001P001R001A00\u0661.skeleton"):  # newline; Arabic digit
        with pytest.raises(DataFormatError, match="unknown file-name pattern: expected SsssCcccPpppRrrrAaaa"):
            parse_name(bad)
    for bad, message in (("S001C001P001R001A000", "A000 is outside the dataset: expected A001-A120"),
                         ("S001C001P001R001A121", "A121 is outside the dataset: expected A001-A120"),
                         ("S001C004P001R001A001", "C004 is outside the dataset: expected C001-C003"),
                         ("S000C001P001R001A001", "S000 is outside the dataset: expected S001 or above"),
                         ("S001C001P000R001A001", "P000 is outside the dataset: expected P001 or above")):
        with pytest.raises(DataFormatError, match=rf"{bad}\.skeleton: {message}$"):
            parse_name(f"{bad}.skeleton")
    with pytest.raises(FileNotFoundError, match="NTU raw data.*directory .*nowhere not found"):
        prepare_ntu(tmp_path / "nowhere", tmp_path / "out", progress=False)

    def split(bm, **ids):
        full = dict(setup=1, camera=1, subject=1, replication=1, action=1) | ids
        return split_of(ntu.NtuName(**full), bm)

    assert [split("xsub", subject=s) for s in (1, 2, 3, 38, 39, 45)] == ["train", "train", "val", "train", "val", "val"]
    assert [split("xsub120", subject=s) for s in (1, 3, 44, 45, 103, 106)] == ["train", "val", "val", "train",
                                                                                "train", "val"]
    assert [split("xview", camera=c) for c in (1, 2, 3)] == ["val", "train", "train"]
    assert [split("xset", setup=s) for s in (1, 2, 17, 32)] == ["val", "train", "val", "train"]
    assert len(ntu.XSUB60_TRAIN) == 20 and len(ntu.XSUB120_TRAIN) == 53


def _raw_dir(ntu_dir, tmp_path, renames=()):
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in sorted(ntu_dir.glob("*.skeleton")):
        shutil.copy(f, raw / f.name)
    for src, dst in renames:
        shutil.copy(ntu_dir / src, raw / dst)
    return raw


def test_prepare_ntu60_and_ntu120(ntu_dir, tmp_path):
    extra = [(ONE, "S002C002P003R001A001.skeleton"),  # camera 2, subject 3: xview train, xsub val
             ("S001C001P001R001A050.skeleton", "S018C001P045R001A106.skeleton")]  # only in NTU-120
    raw = _raw_dir(ntu_dir, tmp_path, extra)
    report = prepare_ntu(raw, tmp_path / "ntu60", version=60, workers=2, progress=False)
    assert report.sizes == {"xsub": {"train": 9, "val": 1}, "xview": {"train": 1, "val": 9}}
    train = PreparedDataset(tmp_path / "ntu60" / "xsub", "train")
    assert train.data.shape == (9, 3, 64, 25, 2)
    assert train.labels.tolist() == [a - 1 for a in FRAMES]
    assert (tmp_path / "ntu60" / "xsub" / "train_names.txt").read_text().split() == \
        [f"S001C001P001R001A{a:03d}" for a in FRAMES]
    assert train.meta["classes"][49] == "punching/slapping other person" and train.num_classes == 60
    assert np.abs(train.data[:, :, :, 20]).max() == 0  # centred on the spine shoulder
    two = np.abs(train.data[..., 1]).sum(axis=(1, 2, 3)) > 0
    assert two.tolist() == [a in TWO_PERSON or a == 27 for a in FRAMES]
    # The same sample under both benchmarks is the same array.
    val = PreparedDataset(tmp_path / "ntu60" / "xview", "val")
    np.testing.assert_array_equal(val.data[:], train.data[:])

    report = prepare_ntu(raw, tmp_path / "ntu120", version=120, workers=1, progress=False)
    assert report.sizes == {"xsub": {"train": 10, "val": 1}, "xset": {"train": 2, "val": 9}}  # S002, S018 even
    xset = PreparedDataset(tmp_path / "ntu120" / "xset", "train")
    assert xset.num_classes == 120 and xset.labels.tolist() == [0, 105]
    (tmp_path / "all.txt").write_text("".join(f"{p.name}\n" for p in raw.iterdir()))
    with pytest.raises(FileNotFoundError, match="nothing to prepare .*10 on the ignore list"):  # S018: not NTU-60
        prepare_ntu(raw, tmp_path / "none", ignore_list=tmp_path / "all.txt", progress=False)


def test_missing_skeletons_ignore_list_and_skip_bad(ntu_dir, tmp_path):
    raw = _raw_dir(ntu_dir, tmp_path)
    (raw / "S001C001P001R001A002.skeleton").write_text("3\n0\n0\n0\n")  # frames without any body
    bad = {}
    for k, kind in enumerate(KINDS):
        name = f"S001C001P001R002A{k + 1:03d}.skeleton"
        lines, bad[name[:-9]] = _variant(_lines(ntu_dir / ONE), kind)
        (raw / name).write_text("\n".join(lines) + "\n")
    (raw / "S1C1P1R1A1.skeleton").write_text("0\n")
    (raw / "ignore.txt").write_text("# comment\nS001C001P001R001A043.skeleton\nS001C001P001R001A058\n")

    with pytest.raises(DataFormatError, match=r"S1C1P1R1A1\.skeleton: unknown file-name pattern"):
        prepare_ntu(raw, tmp_path / "out", progress=False)
    (raw / "S1C1P1R1A1.skeleton").unlink()
    with pytest.raises(DataFormatError, match=r"R002A001\.skeleton:1000: file ends early"):  # the first bad file
        prepare_ntu(raw, tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out" / "xsub").exists()  # no half dataset
    (raw / "S1C1P1R1A1.skeleton").write_text("0\n")
    report = prepare_ntu(raw, tmp_path / "out", ignore_list=raw / "ignore.txt", skip_bad=True, workers=2,
                         progress=False)
    assert report.ignored == 2 and report.missing == ["S001C001P001R001A002"]
    skipped = dict(report.skipped)
    assert set(skipped) == set(bad) | {"S1C1P1R1A1"}
    for name, message in bad.items():
        assert message.lstrip(":").split(":")[-1].strip().replace("\\", "")[:20] in skipped[name].replace("\\", "")
    assert report.sizes["xsub"] == {"train": 7, "val": 0}
    listed = (tmp_path / "out" / "xsub" / "skipped.txt").read_text().splitlines()
    assert len(listed) == len(skipped) and all("\t" in line for line in listed)
    assert (tmp_path / "out" / "xsub" / "missing_skeletons.txt").read_text().split() == ["S001C001P001R001A002"]
    summary = report.summary()
    assert "missing skeletons" in summary and "skipped bad inputs" in summary and "S1C1P1R1A1" in summary


def test_interrupted_run_resumes_without_reparsing(ntu_dir, tmp_path, monkeypatch):
    raw = _raw_dir(ntu_dir, tmp_path)
    last = raw / "S001C001P001R001A060.skeleton"
    good = last.read_bytes()
    last.write_bytes(good[:5000])  # the last file (in name order) is cut short: the run stops there
    calls = []
    parse = ntu.read_skeleton
    monkeypatch.setattr(ntu, "read_skeleton", lambda p: calls.append(p) or parse(p))
    with pytest.raises(DataFormatError, match="A060.skeleton.*truncated"):
        prepare_ntu(raw, tmp_path / "out", workers=1, progress=False)
    assert len(calls) == 9 and not (tmp_path / "out" / "xsub").exists()
    assert (tmp_path / "out.work" / "status.npy").exists()
    last.write_bytes(good)
    calls.clear()
    report = prepare_ntu(raw, tmp_path / "out", workers=1, progress=False)
    assert [p.endswith("A060.skeleton") for p in calls] == [True]  # only the unfinished sample
    assert report.sizes["xsub"] == {"train": 9, "val": 0} and not (tmp_path / "out.work").exists()
    fresh = prepare_ntu(raw, tmp_path / "fresh", workers=1, progress=False)
    assert fresh.sizes == report.sizes
    for bm in ("xsub", "xview"):
        a, b = (np.load(tmp_path / d / bm / f"{'train' if bm == 'xsub' else 'val'}_data.npy") for d in ("out", "fresh"))
        np.testing.assert_array_equal(a, b)
    calls.clear()
    again = prepare_ntu(raw, tmp_path / "out", workers=1, progress=False)  # everything done: nothing to do
    assert calls == [] and again.reused == ["xsub", "xview"]
    with pytest.raises(FileExistsError, match="other settings.*--force"):
        prepare_ntu(raw, tmp_path / "out", bodies="official", workers=1, progress=False)


def test_cli_prepare_and_errors(ntu_dir, tmp_path, capsys):
    assert main(["prepare", "ntu60", "--raw", str(ntu_dir), "--out", str(tmp_path / "o"), "--frames", "32",
                 "--bodies", "official", "--official-preprocessing", "--no-progress", "--workers", "2"]) == 0
    assert "xsub: train 9, val 0" in capsys.readouterr().out
    d = PreparedDataset(tmp_path / "o" / "xview", "val")
    assert d.data.shape == (9, 3, 32, 25, 2)
    assert d.meta["options"] == {"bodies": "official", "frames": 32, "official": True}
    raw = _raw_dir(ntu_dir, tmp_path)
    (raw / ONE).write_text("")
    assert main(["prepare", "ntu60", "--raw", str(raw), "--out", str(tmp_path / "p"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "A001.skeleton:1: empty file" in err and "--skip-bad" in err


# Inputs that --skip-bad could not skip (a traceback, a hang, or a label of -1 at training time): each is a
# DataFormatError naming the file, stops the run with the --skip-bad hint, and --skip-bad lists it.
def _unreadable(raw, monkeypatch):  # as root chmod 000 still reads, so open() is made to fail as it would
    path = raw / "S001C001P001R002A001.skeleton"
    shutil.copy(raw / ONE, path)
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: _denied(p) if str(p) == str(path) else real_open(p, *a, **k))
    return path


def _denied(path):
    raise PermissionError(13, "Permission denied", str(path))


BAD_INPUTS = {
    "directory": (lambda raw, mp: (raw / "S001C001P001R002A001.skeleton").mkdir(),
                  r"R002A001\.skeleton: expected a regular file, found a directory$"),
    "unreadable": (_unreadable, r"R002A001\.skeleton: cannot open the file: Permission denied$"),
    "action 0": (lambda raw, mp: shutil.copy(raw / ONE, raw / "S001C001P001R002A000.skeleton"),
                 r"R002A000\.skeleton: A000 is outside the dataset: expected A001-A120$"),
    "camera 4": (lambda raw, mp: shutil.copy(raw / ONE, raw / "S001C004P001R002A001.skeleton"),
                 r"C004P001R002A001\.skeleton: C004 is outside the dataset: expected C001-C003$"),
    "newline in the name": (lambda raw, mp: shutil.copy(raw / ONE, raw / "S001C001P001R002A001\n.skeleton"),
                            r"R002A001\\n\.skeleton': unknown file-name pattern"),
    "1e39": (lambda raw, mp: _write(raw / "S001C001P001R002A001.skeleton", _variant(_lines(raw / ONE), "1e39")[0]),
             r"R002A001\.skeleton:33: non-finite coordinate \(1e\+39\)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_stop_with_the_file_or_are_skipped(ntu_dir, tmp_path, monkeypatch, capsys, case):
    raw = _raw_dir(ntu_dir, tmp_path)
    make, message = BAD_INPUTS[case]
    make(raw, monkeypatch)
    with pytest.raises(DataFormatError, match=message) as err:
        prepare_ntu(raw, tmp_path / "out", workers=1, progress=False)
    assert err.value.skippable and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    report = prepare_ntu(raw, tmp_path / "out", skip_bad=True, workers=1, progress=False)
    assert report.sizes["xsub"] == {"train": 9, "val": 0} and len(report.skipped) == 1
    listed = (tmp_path / "out" / "xsub" / "skipped.txt").read_text().splitlines()
    assert len(listed) == 1 and re.search(message.rstrip("$"), listed[0])
    assert re.search(message.rstrip("$"), report.summary())
    capsys.readouterr()
    assert main(["prepare", "ntu60", "--raw", str(raw), "--out", str(tmp_path / "cli"), "--workers", "1",
                 "--no-progress"]) == 1
    err_lines = capsys.readouterr().err.splitlines()
    assert len(err_lines) == 1 and re.search(message.rstrip("$") + r".* \(--skip-bad leaves such inputs out",
                                             err_lines[0])


def test_a_fifo_named_skeleton_is_refused_without_blocking(ntu_dir, tmp_path):
    raw = _raw_dir(ntu_dir, tmp_path)
    os.mkfifo(raw / "S001C001P001R002A001.skeleton")  # open() for reading would wait for a writer forever
    command = [sys.executable, "-m", "skelemix.data", "prepare", "ntu60", "--raw", str(raw), "--no-progress"]
    run = subprocess.run([*command, "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.splitlines() == [f"error: {raw}/S001C001P001R002A001.skeleton: expected a regular file, found "
                                       "a FIFO (--skip-bad leaves such inputs out and lists them)"]
    run = subprocess.run([*command, "--out", str(tmp_path / "b"), "--skip-bad", "--workers", "2"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "skipped bad inputs (--skip-bad): 1" in run.stdout and "found a FIFO" in run.stdout
    assert PreparedDataset(tmp_path / "b" / "xsub", "train").data.shape[0] == 9


def test_values_that_overflow_in_preprocessing_are_refused(ntu_dir, tmp_path):
    """Coordinates that are finite float32 numbers but whose differences overflow (centring on the spine)
    are caught where samples are stored: nothing non-finite is written."""
    raw = _raw_dir(ntu_dir, tmp_path)
    lines = _lines(raw / ONE)
    for line, value in ((4, "-3e38"), (24, "3e38")):  # frame 1: joint 1, and joint 21 (the centre)
        parts = lines[line].split()
        parts[0] = value
        lines[line] = " ".join(parts)
    _write(raw / ONE, lines)
    assert np.isfinite(read_skeleton(raw / ONE).xyz).all()
    with pytest.raises(DataFormatError, match=r"A001\.skeleton: non-finite values in the prepared sample: a "
                                              r"coordinate \(or a difference of two\) is beyond the float32 range"):
        prepare_ntu(raw, tmp_path / "out", workers=2, progress=False)
    report = prepare_ntu(raw, tmp_path / "out", skip_bad=True, workers=2, progress=False)
    assert [n for n, _ in report.skipped] == ["S001C001P001R001A001"]
    for bm, split in (("xsub", "train"), ("xview", "val")):
        assert np.isfinite(PreparedDataset(tmp_path / "out" / bm, split).data[:]).all()


@pytest.mark.parametrize("frames,message", [("0", "expected a whole number >= 1, got 0"),
                                            ("-4", "expected a whole number >= 1, got -4"),
                                            ("x", "expected a whole number >= 1, got 'x'")])
def test_frame_and_worker_counts_are_checked(ntu_dir, tmp_path, capsys, frames, message):
    for option in ("--frames", "--workers"):
        with pytest.raises(SystemExit) as exit_:
            main(["prepare", "ntu60", "--raw", str(ntu_dir), "--out", str(tmp_path / "o"), option, frames])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.splitlines() == [
            f"python -m skelemix.data prepare: error: argument {option}: {message} (see --help)"]
    value = frames if frames == "x" else int(frames)
    with pytest.raises(ValueError, match=rf"frames must be a whole number >= 1; got {value!r}"):
        prepare_ntu(ntu_dir, tmp_path / "o", frames=value, progress=False)
    with pytest.raises(ValueError, match=rf"workers must be a whole number >= 1 \(or None: all cores\); got {value!r}"):
        prepare_ntu(ntu_dir, tmp_path / "o", workers=value, progress=False)
    assert not (tmp_path / "o").exists()


def test_check_name_refuses_names_that_escape_or_split_lines():
    for name in ("S001", "xsub", "a b", "a.b", "train-1", "ä"):
        assert check_name(name, "f.pkl", "name") == name
    for name, problem in (("", "is empty"), ("/abs", "contains a path separator"),
                          ("a\\b", "contains a path separator"),
                          ("x..y", "contains '..'"), ("..", "contains '..'"), (".", "starts with '.'"),
                          ("a\nb", "contains a control or other non-printable character"),
                          ("a\tb", "contains a control"), ("a\x00", "contains a control"),
                          ("a\u2028b", "contains a control"), (" a", "starts or ends with a space"),
                          ("x" * 201, "is longer than 200 bytes")):
        with pytest.raises(DataFormatError, match=rf"^f\.pkl: refusing name .*: it {re.escape(problem)}") as err:
            check_name(name, "f.pkl", "name")
        assert "\n" not in str(err.value)
    with pytest.raises(DataFormatError, match=r"name must be a string; found int 5"):
        check_name(5, "f.pkl", "name")
