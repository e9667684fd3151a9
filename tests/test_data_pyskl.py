"""PYSKL annotation pickles: round trip, the restricted unpickler, malformed annotations."""
import os
import pickle
import re

import numpy as np
import pytest

from skelemix.data import PreparedDataset, write_synthetic
from skelemix.data.__main__ import main
from skelemix.data.errors import DataFormatError
from skelemix.data.pyskl import export_pyskl, prepare_pyskl, read_pyskl
from skelemix.data.safe_pickle import UnsafePickleError, load, loads


def test_round_trip_through_the_cli(tmp_path):
    write_synthetic(tmp_path / "syn", 12, 6, frames=16, seed=1)
    assert main(["export", "pyskl", "--prepared", str(tmp_path / "syn"), "--out", str(tmp_path / "a.pkl")]) == 0
    data = read_pyskl(tmp_path / "a.pkl")
    assert sorted(data["split"]) == ["train", "val"] and len(data["annotations"]) == 18
    ann = data["annotations"][0]
    assert ann["keypoint"].shape == (2, 16, 25, 3) and ann["total_frames"] == 16
    assert main(["prepare", "pyskl", "--raw", str(tmp_path / "a.pkl"), "--out", str(tmp_path / "back"), "--frames",
                 "16", "--preprocessing", "resize", "--no-progress"]) == 0
    for split in ("train", "val"):
        a, b = PreparedDataset(tmp_path / "syn", split), PreparedDataset(tmp_path / "back", split)
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert (tmp_path / "syn" / f"{split}_names.txt").read_text() == \
            (tmp_path / "back" / f"{split}_names.txt").read_text()
    export_pyskl(tmp_path / "back", tmp_path / "b.pkl")
    again = load(tmp_path / "b.pkl")
    assert again["split"] == data["split"]
    for x, y in zip(again["annotations"], data["annotations"]):
        assert x["frame_dir"] == y["frame_dir"] and x["label"] == y["label"]
        np.testing.assert_array_equal(x["keypoint"], y["keypoint"])


def test_benchmark_prefixed_splits_and_full_preprocessing(tmp_path):
    rng = np.random.default_rng(0)
    anns = [{"frame_dir": f"s{i}", "label": i % 3, "total_frames": 20 + i,
             "keypoint": rng.normal(size=(1 + i % 2, 20 + i, 25, 3)).astype(np.float32)} for i in range(6)]
    split = {"xsub_train": ["s0", "s1", "s2"], "xsub_val": ["s3", "s4", "s5"], "xview_train": ["s0", "s3"],
             "xview_val": ["s1", "s2", "s4"]}  # s5 is in no xview split
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps({"split": split, "annotations": anns}))
    report = prepare_pyskl(path, tmp_path / "out", frames=32, progress=False)
    assert report.sizes == {"xsub": {"train": 3, "val": 3}, "xview": {"train": 2, "val": 3}}
    d = PreparedDataset(tmp_path / "out" / "xview", "train")
    assert d.data.shape == (2, 3, 32, 25, 2) and d.labels.tolist() == [0, 0]
    assert np.abs(d.data[:, :, :, 20]).max() == 0 and np.abs(d.data[0, ..., 1]).max() == 0  # s0 has one body
    from skelemix.data.preprocess import preprocess
    x = np.zeros((3, 23, 25, 2), np.float32)
    x[..., :2] = anns[3]["keypoint"].transpose(3, 1, 2, 0)
    np.testing.assert_array_equal(d.data[1], preprocess(x, 32))


class _Evil:
    def __reduce__(self):
        return os.system, ("echo this must never run",)


def test_restricted_unpickler_loads_arrays_and_refuses_code(tmp_path):
    for protocol in range(6):
        obj = {"a": np.arange(6.0).reshape(2, 3), "b": [np.float32(2), np.zeros(3, np.int64), b"x"],
               "c": (1, None, {2})}
        out = loads(pickle.dumps(obj, protocol=protocol))
        np.testing.assert_array_equal(out["a"], obj["a"])
        assert out["b"][0] == 2 and out["c"] == (1, None, {2})
    with pytest.raises(UnsafePickleError, match="refusing to load global (posix|nt).system"):
        loads(pickle.dumps({"annotations": [_Evil()]}))
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"split": {}, "annotations": [_Evil()]}))
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl: refusing"):
        prepare_pyskl(tmp_path / "evil.pkl", tmp_path / "o", progress=False)
    assert main(["prepare", "pyskl", "--raw", str(tmp_path / "evil.pkl"), "--out", str(tmp_path / "o")]) == 1


@pytest.mark.parametrize("edit,message", [
    (lambda a: a.update(keypoint=np.zeros((1, 5, 17, 4), np.float32)), r"4 coordinates; expected 2 \(x, y\) or 3"),
    (lambda a: a.update(keypoint=np.zeros((1, 5, 18, 3), np.float32)),
     r"wrong joint count: expected 17 \(coco-17\) or 20 \(nw-ucla\) or 25 \(ntu-rgb\+d\) \(or pass a layout file\)"),
    (lambda a: a.update(keypoint=np.ones((1, 5, 25, 2), np.float32), keypoint_score=np.ones((1, 5, 24), np.float32)),
     r"'keypoint_score' must be a float array of the keypoints' \(M, T, V\) = \(1, 5, 25\); got \(1, 5, 24\)"),
    (lambda a: a.update(total_frames=6), "total_frames is 6 but the keypoints have 5"),
    (lambda a: a["keypoint"].__setitem__((0, 2, 3, 1), np.inf), "non-finite keypoint values"),
    (lambda a: a.pop("label"), "expected a dict with 'frame_dir', 'label', 'keypoint'"),
])
def test_malformed_annotations_are_named(tmp_path, edit, message):
    ann = {"frame_dir": "S001C001P001R001A001", "label": 0, "total_frames": 5,
           "keypoint": np.ones((1, 5, 25, 3), np.float32)}
    edit(ann)
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps({"split": {"train": ["S001C001P001R001A001"]}, "annotations": [ann]}))
    with pytest.raises(DataFormatError, match=r"bad\.pkl: annotation 0.*" + message):
        read_pyskl(path)
    path.write_bytes(b"")
    with pytest.raises(DataFormatError, match="empty file"):
        read_pyskl(path)


@pytest.mark.needs_data
def test_pyskl_of_real_ntu_skeletons_matches_the_ntu_converter(shared_data, tmp_path):
    from skelemix.data.ntu import prepare_ntu, read_xyz
    files = sorted((shared_data / "ntu").glob("*.skeleton"))
    names = [f.name[:-9] for f in files]
    anns = [{"frame_dir": n, "label": int(n[-3:]) - 1, "keypoint": read_xyz(f).transpose(3, 1, 2, 0),
             "total_frames": read_xyz(f).shape[1]} for n, f in zip(names, files)]
    (tmp_path / "ntu.pkl").write_bytes(pickle.dumps({"split": {"xsub_train": names}, "annotations": anns}))
    prepare_pyskl(tmp_path / "ntu.pkl", tmp_path / "pyskl", progress=False)
    prepare_ntu(shared_data / "ntu", tmp_path / "ntu", workers=1, progress=False)
    a, b = PreparedDataset(tmp_path / "pyskl" / "xsub", "train"), PreparedDataset(tmp_path / "ntu" / "xsub", "train")
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.meta["classes"] == b.meta["classes"]


def _pickle(path, split, frame_dirs=("s0", "s1"), **ann_fields):
    anns = [{"frame_dir": f, "label": 0, "keypoint": np.ones((1, 5, 25, 3), np.float32), **ann_fields}
            for f in frame_dirs]
    path.write_bytes(pickle.dumps({"split": split, "annotations": anns}))
    return path


@pytest.mark.parametrize("split,problem", [
    ("{victim}_train", "contains a path separator"),  # an absolute benchmark folder
    ("xsub_../../../victim", "contains a path separator"),  # a split file outside the benchmark folder
    ("../victim", "contains a path separator"),
    ("..", "contains '..'"),
    ("xsub_", "is empty"),
    ("x\nsub_train", "contains a control or other non-printable character"),
])
def test_split_names_cannot_write_or_delete_outside_out(tmp_path, capsys, split, problem):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "meta.json").write_text("{}")  # looks like a prepared dataset: --force would have replaced it
    (victim / "precious.txt").write_text("keep")
    split = split.format(victim=victim)
    other = "xview_val" if "_" in split else "val"  # names with a benchmark prefix, or none at all
    pkl = _pickle(tmp_path / "evil.pkl", {split: ["s0"], other: ["s1"]})
    before = sorted(p for p in tmp_path.rglob("*"))
    message = rf"evil\.pkl: refusing (split|benchmark) name .*: it {re.escape(problem)}"
    with pytest.raises(DataFormatError, match=message) as err:
        prepare_pyskl(pkl, tmp_path / "out", force=True, progress=False)
    assert not err.value.skippable
    assert main(["prepare", "pyskl", "--raw", str(pkl), "--out", str(tmp_path / "out"), "--force",
                 "--no-progress"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and re.match(rf"error: {re.escape(str(pkl))}: refusing", lines[0])
    assert "--skip-bad" not in lines[0]  # it would not help: the whole file is refused
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, nothing removed
    assert (victim / "precious.txt").read_text() == "keep"


def test_frame_dirs_that_would_break_the_names_file_are_refused(tmp_path):
    for frame_dir, problem in (("s0\ns9", "contains a control"), ("s0\r", "contains a control"),
                               ("../s0", "contains a path separator"), ("", "is empty")):
        pkl = _pickle(tmp_path / "bad.pkl", {"train": [frame_dir, "s1"]}, frame_dirs=(frame_dir, "s1"))
        with pytest.raises(DataFormatError, match=rf"bad\.pkl: refusing sample name .*: it {problem}") as err:
            prepare_pyskl(pkl, tmp_path / "out", progress=False)
        assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("data,message", [
    ({"split": {"train": "s0"}, "annotations": []}, r"split 'train': expected a split name mapped to a list"),
    ({"split": {"train": [["s0"]]}, "annotations": []}, r"split 'train': expected a split name mapped to a list"),
    ({"split": {5: ["s0"]}, "annotations": []}, r"split 5: expected a split name mapped to a list"),
    ({"split": {}, "annotations": [{"frame_dir": ["s0"], "label": 0, "keypoint": np.ones((1, 5, 25, 3))}]},
     r"annotation 0: 'frame_dir' must be a string; found \['s0'\]"),
    ({"split": {}, "annotations": [{"frame_dir": "s0", "label": 0, "total_frames": "5",
                                    "keypoint": np.ones((1, 5, 25, 3))}]},
     r"annotation 0 \('s0'\): total_frames is '5' but the keypoints have 5"),
    ({"split": {}, "annotations": [{"frame_dir": "s0", "label": 0, "keypoint": np.full((1, 5, 25, 3), 1e39)}]},
     r"annotation 0 \('s0'\): non-finite keypoint values \(or beyond the float32 range, 3\.4e38\)"),
])
def test_malformed_structure_is_a_data_error(tmp_path, data, message):
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps(data))
    with pytest.raises(DataFormatError, match=rf"bad\.pkl: {message}"):
        read_pyskl(tmp_path / "bad.pkl")


def test_options_fifo_and_layout_are_checked(tmp_path):
    pkl = _pickle(tmp_path / "a.pkl", {"train": ["s0", "s1"]})
    with pytest.raises(ValueError, match="preprocessing must be 'full' or 'resize'; got 'none'"):
        prepare_pyskl(pkl, tmp_path / "o", preprocessing="none", progress=False)
    with pytest.raises(ValueError, match=r"layout must be one of \['coco-17', 'ntu-rgb\+d', 'nw-ucla'\] or a layout "
                                         "YAML file; got 'kinect'"):
        prepare_pyskl(pkl, tmp_path / "o", layout="kinect", progress=False)
    with pytest.raises(DataFormatError, match=r"a\.pkl: annotation 0 \('s0'\): wrong joint count: expected 20 "
                                              r"\(layout nw-ucla\), found 25"):
        prepare_pyskl(pkl, tmp_path / "o", layout="nw-ucla", progress=False)
    with pytest.raises(ValueError, match="frames must be a whole number >= 1; got 0"):
        prepare_pyskl(pkl, tmp_path / "o", frames=0, progress=False)
    assert not (tmp_path / "o").exists()
    os.mkfifo(tmp_path / "fifo.pkl")  # reading it would block forever
    with pytest.raises(DataFormatError, match=r"fifo\.pkl: expected a regular file \(a PYSKL annotation \.pkl\)"):
        read_pyskl(tmp_path / "fifo.pkl")


def test_unreadable_pickle_and_cli_choices(tmp_path, monkeypatch, capsys):
    pkl = _pickle(tmp_path / "a.pkl", {"train": ["s0", "s1"]})
    real_open = os.open

    def open_(path, *args, **kwargs):  # as root chmod 000 still reads: refuse the way open() would for a user
        if str(path) == str(pkl):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("os.open", open_)
    assert main(["prepare", "pyskl", "--raw", str(pkl), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert capsys.readouterr().err.splitlines() == [f"error: {pkl}: cannot open the file: Permission denied"]
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "pyskl", "--raw", str(pkl), "--out", str(tmp_path / "o"), "--layout", "kinect"])
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "argument --layout: invalid choice: 'kinect'" in err[0]
