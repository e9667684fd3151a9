"""PKU-MMD: clips cut from generated recordings (built from real NTU skeletons), splits, malformed files."""
import os
import re
import shutil

import numpy as np
import pytest

from skelemix.data import PreparedDataset
from skelemix.data.__main__ import main
from skelemix.data.errors import DataFormatError
from skelemix.data.pkummd import prepare_pkummd, read_labels, read_split_file, read_video
from skelemix.data.preprocess import preprocess


def _recording(rng, T, two):
    x = rng.normal(size=(T, 2, 25, 3)) * 0.3 + [0, 0, 3]
    if not two:
        x[:, 1] = 0
    return x


def _write_video(path, x, width=150):
    rows = x.reshape(len(x), -1)[:, :width]
    path.write_text("".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in rows))


@pytest.fixture
def pku(tmp_path):
    rng = np.random.default_rng(0)
    skel = tmp_path / "PKUMMD" / "Data" / "PKU_Skeleton_Renew"
    label = tmp_path / "PKUMMD" / "Label" / "Train_Label_PKU_final"
    skel.mkdir(parents=True)
    label.mkdir(parents=True)
    videos = {}
    for v, (video, two) in enumerate((("0002-L", False), ("0002-M", True), ("0003-R", False))):
        x = _recording(rng, 120, two)
        _write_video(skel / f"{video}.txt", x, 150 if two or v == 0 else 75)
        clips = [(3 + v, 1, 40), (14, 41, 100), (51, 101, 120)]
        (label / f"{video}.txt").write_text("".join(f"{a},{s},{e},{1 + k % 2}\n" for k, (a, s, e) in enumerate(clips)))
        videos[video] = (x, clips)
    split = tmp_path / "cross-subject.txt"
    split.write_text("Training videos: \n0002-L, 0002-M, \nValidataion videos: \n0003-R\n")
    return tmp_path / "PKUMMD", videos, split


def test_clips_splits_and_values(pku, tmp_path):
    raw, videos, split = pku
    report = prepare_pkummd(raw, tmp_path / "out", frames=32, split_file=split, workers=2, progress=False)
    assert report.sizes == {"xview": {"train": 6, "val": 3}, "xsub": {"train": 6, "val": 3}}
    d = PreparedDataset(tmp_path / "out" / "xsub", "train")
    assert d.data.shape == (6, 3, 32, 25, 2) and d.num_classes == 51
    assert d.labels.tolist() == [2, 13, 50, 3, 13, 50]
    assert (tmp_path / "out" / "xview" / "val_names.txt").read_text().split() == ["0002-L_000", "0002-L_001",
                                                                                   "0002-L_002"]
    x, clips = videos["0002-M"]
    raw_clip = x[40:100].astype(np.float32).transpose(3, 0, 2, 1)  # frames 41-100, 1-based inclusive
    np.testing.assert_allclose(d.data[4], preprocess(raw_clip, 32), atol=1e-5)
    one = read_video(raw / "Data" / "PKU_Skeleton_Renew" / "0003-R.txt")  # 75 values per line
    assert one.shape == (3, 120, 25, 2) and np.abs(one[..., 1]).max() == 0
    no_xsub = prepare_pkummd(raw, tmp_path / "out2", frames=32, progress=False, workers=1)
    assert list(no_xsub.sizes) == ["xview"]
    assert read_split_file(split) == {"0002-L": "train", "0002-M": "train", "0003-R": "val"}


def test_malformed_inputs(pku, tmp_path):
    raw, videos, split = pku
    skel = raw / "Data" / "PKU_Skeleton_Renew"
    label = raw / "Label" / "Train_Label_PKU_final"
    lines = (skel / "0002-M.txt").read_text().splitlines()
    cases = {
        "short line": (lines[:7] + [" ".join(lines[7].split()[:149])] + lines[8:], r":8: expected 150 values"),
        "token": (lines[:3] + [lines[3].replace(lines[3].split()[5], "abc", 1)] + lines[4:], r":4: non-numeric token"),
        "nan": (lines[:9] + [lines[9].replace(lines[9].split()[0], "nan", 1)] + lines[10:], r":10: non-finite value"),
        "width": ([" ".join(line.split()[:120]) for line in lines], r":1: wrong joint count: expected 150 values"),
        "empty": ([], r":1: empty file"),
    }
    for kind, (content, message) in cases.items():
        path = tmp_path / f"{kind}.txt"
        path.write_text("".join(f"{line}\n" for line in content))
        with pytest.raises(DataFormatError, match=rf"{kind}\.txt{message}"):
            read_video(path)
    for content, message in (("3,1,40\n", r":1: expected 'action, start_frame, end_frame, confidence'"),
                             ("3,1,x,1\n", r":1: non-numeric token"), ("52,1,4,1\n", r":1: action 52 outside 1..51"),
                             ("3,9,4,1\n", r":1: expected 1 <= start_frame <= end_frame"), ("\n", r":1: empty label")):
        (tmp_path / "l.txt").write_text(content)
        with pytest.raises(DataFormatError, match=r"l\.txt" + message):
            read_labels(tmp_path / "l.txt")
    (label / "0003-R.txt").write_text("3,100,130,1\n")  # past the end of the 120-frame recording
    with pytest.raises(DataFormatError, match=r"0003-R\.txt: a label asks for frames 100-130, the file has 120"):
        prepare_pkummd(raw, tmp_path / "o", workers=1, progress=False)
    (skel / "0004.txt").write_text("1 2 3\n")
    report = prepare_pkummd(raw, tmp_path / "o", frames=16, skip_bad=True, workers=1, progress=False)
    assert report.sizes == {"xview": {"train": 3, "val": 3}}
    assert [n for n, _ in report.skipped] == ["0004", "0003-R_000"]
    assert "unknown file-name pattern" in report.skipped[0][1]
    with pytest.raises(FileNotFoundError, match="no folder with 'skeleton'"):
        prepare_pkummd(raw / "Label", tmp_path / "p", progress=False)


def test_special_files_huge_values_and_unsafe_names_are_skippable(pku, tmp_path, monkeypatch, capsys, no_hang):
    """Inputs that used to escape as a traceback, a hang or inf: each stops the run with its file, and
    --skip-bad lists it and prepares the rest."""
    raw, videos, split = pku
    skel = raw / "Data" / "PKU_Skeleton_Renew"
    label = raw / "Label" / "Train_Label_PKU_final"
    lines = (skel / "0002-M.txt").read_text().splitlines()

    def copy_labels(video):
        (label / f"{video}.txt").write_text((label / "0002-M.txt").read_text())

    def huge(video):  # 1e39 is a finite float64 but inf as the float32 that is stored
        (skel / f"{video}.txt").write_text("\n".join(lines[:5] + [lines[5].replace(lines[5].split()[2], "1e39", 1)]
                                                     + lines[6:]) + "\n")
        copy_labels(video)

    def unreadable(video):  # root reads chmod-000 files: open() refuses it the way it would for a user
        (skel / f"{video}.txt").write_text("\n".join(lines) + "\n")
        copy_labels(video)
        real_open = os.open
        monkeypatch.setattr(os, "open", lambda p, *a, **k: _refuse(p) if str(p).endswith(f"{video}.txt")
                            and "Skeleton" in str(p) else real_open(p, *a, **k))

    def tab(video):
        (skel / f"{video}.txt").write_text("\n".join(lines) + "\n")
        copy_labels(video)

    # video -> (make it, message, whether the error is per clip (the file is parsed) or per video (listing))
    cases = {
        "0005-L": (lambda v: (skel / f"{v}.txt").mkdir() or copy_labels(v), "expected a regular file, found a "
                   "directory", True),
        "0006-L": (lambda v: os.mkfifo(skel / f"{v}.txt") or copy_labels(v), "expected a regular file, found a FIFO",
                   True),
        "0007-L": (huge, r":6: non-finite value: coordinates must be finite float32 numbers", True),
        "0008-L": (unreadable, "cannot open the file: Permission denied", True),
        "0009-L": (lambda v: (tab(v), (label / f"{v}.txt").unlink(), (label / f"{v}.txt").mkdir()),  # the label file
                   r"Train_Label_PKU_final/0009-L\.txt: expected a regular file, found a directory", False),
        "00\t10-L": (tab, r"refusing video name '00\\t10-L': it contains a control or other non-printable character",
                     False),
    }
    for video, (make, message, per_clip) in cases.items():
        make(video)
        with pytest.raises(DataFormatError, match=message) as err:
            prepare_pkummd(raw, tmp_path / "o", frames=16, workers=1, progress=False)
        assert err.value.skippable and "\n" not in str(err.value) and not (tmp_path / "o").exists()
        report = prepare_pkummd(raw, tmp_path / "o", frames=16, skip_bad=True, workers=2, progress=False)
        names = [f"{video}_{k:03d}" for k in range(3)] if per_clip else [video]
        assert [n for n, _ in report.skipped] == names and all(re.search(message, e) for _, e in report.skipped)
        assert report.sizes == {"xview": {"train": 6, "val": 3}}
        listed = (tmp_path / "o" / "xview" / "skipped.txt").read_text().splitlines()
        assert len(listed) == len(names) and all(re.search(message, line) for line in listed)
        shutil.rmtree(tmp_path / "o")
        for path in (skel / f"{video}.txt", label / f"{video}.txt"):  # the next case alone
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        monkeypatch.undo()


def _refuse(path):
    raise PermissionError(13, "Permission denied", str(path))


def test_cli_errors_are_one_line(pku, tmp_path, capsys):
    raw, videos, split = pku
    (raw / "Label" / "Train_Label_PKU_final" / "0003-R.txt").write_text("3,1,40,1\n3,1,400,1\n")  # past the end
    assert main(["prepare", "pkummd", "--raw", str(raw), "--out", str(tmp_path / "o"), "--no-progress",
                 "--workers", "1"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {raw}/Data/PKU_Skeleton_Renew/0003-R.txt: a label asks for frames 1-400, the file has 120 frames "
        "(--skip-bad leaves such inputs out and lists them)"]
    split.write_bytes(b"Training videos: \xff\n")
    assert main(["prepare", "pkummd", "--raw", str(raw), "--out", str(tmp_path / "o"), "--split-file", str(split),
                 "--no-progress"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {split}: not UTF-8 text (byte offset 17: invalid start byte)"]
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "pkummd", "--raw", str(raw), "--out", str(tmp_path / "o"), "--test-view", "X"])
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "argument --test-view: invalid choice: 'X'" in err[0]
