"""NW-UCLA: preparation of the complete real all_sqe set, the test list check, malformed files."""
import json
import os
import re
import shutil
import time

import numpy as np
import pytest

from skelemix.data import PreparedDataset, read_meta
from skelemix.data.__main__ import main
from skelemix.data.errors import DataFormatError
from skelemix.data.nwucla import parse_name, prepare_nwucla, read_sequence

pytestmark = pytest.mark.needs_data


def test_real_cross_view_preparation(shared_data, tmp_path):
    start = time.perf_counter()
    report = prepare_nwucla(shared_data / "nw-ucla", tmp_path / "ucla", workers=2, progress=False)
    elapsed = time.perf_counter() - start
    assert report.sizes == {None: {"train": 1020, "val": 464}} and not report.missing and not report.skipped
    assert elapsed < 60, f"NW-UCLA preparation took {elapsed:.1f} s"
    train, val = PreparedDataset(tmp_path / "ucla", "train"), PreparedDataset(tmp_path / "ucla", "val")
    assert train.data.shape == (1020, 3, 64, 20, 1) and val.data.shape == (464, 3, 64, 20, 1)
    assert train.num_classes == 10 and train.meta["layout"] == "nw-ucla"
    assert sorted(set(train.labels.tolist())) == sorted(set(val.labels.tolist())) == list(range(10))
    names = (tmp_path / "ucla" / "val_names.txt").read_text().split()
    assert all(n.endswith("_v03") for n in names)
    assert not any(n.endswith("_v03") for n in (tmp_path / "ucla" / "train_names.txt").read_text().split())
    assert np.abs(train.data[:, :, :, 2]).max() == 0  # centred on the shoulder centre
    shoulders = val.data[:, :, :, 8] - val.data[:, :, :, 4]
    assert np.abs(shoulders[:, 2]).max() < 1e-5  # shoulders on +x in every frame
    # The labels agree with CTR-GCN's val_label.pkl (checked during preparation; here once more by hand).
    from skelemix.data.safe_pickle import load
    listed = {e["file_name"]: e["label"] - 1 for e in load(shared_data / "nw-ucla" / "val_label.pkl")}
    assert dict(zip(names, val.labels.tolist())) == listed


def _copy_subset(shared_data, tmp_path, names):
    raw = tmp_path / "raw" / "all_sqe"
    raw.mkdir(parents=True)
    for n in names:
        shutil.copy(shared_data / "nw-ucla" / "all_sqe" / f"{n}.json", raw / f"{n}.json")
    return raw


def test_malformed_files_and_the_test_list_check(shared_data, tmp_path):
    names = ["a01_s01_e00_v01", "a12_s10_e01_v03", "a08_s02_e01_v02"]
    raw = _copy_subset(shared_data, tmp_path, names)
    x = read_sequence(raw / "a01_s01_e00_v01.json")
    assert x.shape[0] == 3 and x.shape[2:] == (20, 1)
    assert parse_name("a11_s03_e00_v03.json") == (11, 3, 0, 3)
    with pytest.raises(DataFormatError, match="unknown action a07"):
        parse_name("a07_s01_e00_v01.json")
    with pytest.raises(DataFormatError, match="unknown file-name pattern"):
        parse_name("a1_s01_e00_v01.json")
    obj = json.loads((raw / "a01_s01_e00_v01.json").read_text())
    cases = {
        "joints": (lambda o: o["skeletons"][3].pop(), r"wrong joint count in frame 3: expected 20 joints, found 19"),
        "nan": (lambda o: o["skeletons"][2][5].__setitem__(1, float("nan")), r"frame 2 joint 5: non-finite"),
        "token": (lambda o: o["skeletons"][1][4].__setitem__(0, "x"), r"frame 1 joint 4: expected 3 numbers"),
        "empty": (lambda o: o["skeletons"].clear(), r"'skeletons' must be a non-empty list"),
    }
    for kind, (edit, message) in cases.items():
        o = json.loads(json.dumps(obj))
        edit(o)
        path = tmp_path / f"{kind}.json"
        path.write_text(json.dumps(o))
        with pytest.raises(DataFormatError, match=rf"{kind}\.json: {message}"):
            read_sequence(path)
    (tmp_path / "trunc.json").write_text((raw / "a01_s01_e00_v01.json").read_text()[:500])
    with pytest.raises(DataFormatError, match=r"trunc\.json:1: not valid JSON"):
        read_sequence(tmp_path / "trunc.json")
    (tmp_path / "blank.json").write_text("")
    with pytest.raises(DataFormatError, match=r"blank\.json:1: empty file"):
        read_sequence(tmp_path / "blank.json")

    report = prepare_nwucla(raw.parent, tmp_path / "ok", workers=1, progress=False)
    assert report.sizes == {None: {"train": 2, "val": 1}}
    shutil.copy(shared_data / "nw-ucla" / "val_label.pkl", raw.parent / "val_label.pkl")
    with pytest.raises(DataFormatError, match=r"val_label\.pkl: the view-3 files disagree.*463 listed but absent"):
        prepare_nwucla(raw.parent, tmp_path / "checked", workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="NW-UCLA raw data.*not found"):
        prepare_nwucla(tmp_path / "nowhere", tmp_path / "x", progress=False)


def _tamper(text: str, kind: str) -> bytes:
    """A real file's JSON text with one of the inputs that used to escape as a traceback or inf."""
    first = text.index("[[[") + 3
    number = re.match(r"-?[0-9.e-]+", text[first:]).group()
    swap = {"5000-digit integer": "9" * 5000, "400-digit integer": "9" * 400, "1e39": "1e39"}
    if kind in swap:
        return (text[:first] + swap[kind] + text[first + len(number):]).encode()
    if kind == "100k-deep":
        return (text[:first] + "[" * 100_000 + "]" * 100_000 + text[first + len(number):]).encode()
    if kind == "not UTF-8":
        return text.encode().replace(b"skeletons", b"skel\xffetons")
    raise AssertionError(kind)


TAMPERED = {"5000-digit integer": r"frame 0 joint 0: non-finite coordinate \[inf, ",
            "400-digit integer": r"frame 0 joint 0: non-finite coordinate \[inf, ",
            "1e39": r"frame 0 joint 0: non-finite coordinate \[1e\+39, .*: x, y, z must be finite float32 numbers",
            "100k-deep": r"not valid JSON for this format: nested too deeply \(expected \[T\]\[20\]\[3\] lists\)",
            "not UTF-8": r"not valid JSON: not UTF-8 text \(byte offset \d+: invalid start byte\)"}


@pytest.mark.parametrize("kind", TAMPERED)
def test_huge_deep_or_undecodable_json_is_a_data_error(shared_data, tmp_path, kind):
    raw = _copy_subset(shared_data, tmp_path, ["a01_s01_e00_v01", "a12_s10_e01_v03"])
    path = raw / "a08_s02_e01_v02.json"
    path.write_bytes(_tamper((shared_data / "nw-ucla" / "all_sqe" / path.name).read_text(), kind))
    with pytest.raises(DataFormatError, match=rf"a08_s02_e01_v02\.json: {TAMPERED[kind]}"):
        read_sequence(path)
    with pytest.raises(DataFormatError, match=TAMPERED[kind]) as err:
        prepare_nwucla(raw.parent, tmp_path / "out", workers=1, progress=False)
    assert err.value.skippable
    report = prepare_nwucla(raw.parent, tmp_path / "out", skip_bad=True, workers=2, progress=False)
    assert report.sizes == {None: {"train": 1, "val": 1}} and [n for n, _ in report.skipped] == ["a08_s02_e01_v02"]
    assert (tmp_path / "out" / "skipped.txt").read_text().startswith("a08_s02_e01_v02\t")
    assert np.isfinite(PreparedDataset(tmp_path / "out", "train").data[:]).all()


# Inputs that --skip-bad could not skip, each made by a function of the file's path.
SPECIAL = {"a01_s01_e00_v04": (lambda p: shutil.copy(p.with_name("a01_s01_e00_v01.json"), p),
                               "unknown view v04: NW-UCLA has views 1-3"),
           "a02_s01_e00_v01": (lambda p: p.mkdir(), "expected a regular file, found a directory"),
           "a03_s01_e00_v01": (os.mkfifo, "expected a regular file, found a FIFO"),  # open() would block forever
           "a04_s01_e00_v01": (lambda p: shutil.copy(p.with_name("a01_s01_e00_v01.json"), p),  # made unreadable
                               "cannot open the file: Permission denied")}


@pytest.fixture
def a04_unreadable(monkeypatch):
    """Root reads chmod-000 files, so open() refuses a04_s01_e00_v01.json the way it would for a user."""
    real_open = os.open

    def open_(path, *args, **kwargs):
        if str(path).endswith("a04_s01_e00_v01.json"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", open_)


@pytest.mark.parametrize("name", SPECIAL)
def test_unknown_views_unreadable_and_special_files_stop_with_the_skip_bad_hint(shared_data, tmp_path, capsys,
                                                                                 a04_unreadable, no_hang, name):
    raw = _copy_subset(shared_data, tmp_path, ["a01_s01_e00_v01", "a12_s10_e01_v03"])
    make, message = SPECIAL[name]
    make(raw / f"{name}.json")
    assert main(["prepare", "nwucla", "--raw", str(raw.parent), "--out", str(tmp_path / "o"), "--workers", "1",
                 "--no-progress"]) == 1
    assert capsys.readouterr().err.splitlines() == [f"error: {raw}/{name}.json: {message} (--skip-bad leaves such "
                                                    "inputs out and lists them)"]
    assert not (tmp_path / "o").exists()


def test_skip_bad_lists_every_special_file(shared_data, tmp_path, capsys, a04_unreadable, no_hang):
    raw = _copy_subset(shared_data, tmp_path, ["a01_s01_e00_v01", "a12_s10_e01_v03"])
    for name, (make, _) in SPECIAL.items():
        make(raw / f"{name}.json")
    assert main(["prepare", "nwucla", "--raw", str(raw.parent), "--out", str(tmp_path / "o"), "--workers", "2",
                 "--no-progress", "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert f"skipped bad inputs (--skip-bad): {len(SPECIAL)}" in out
    listed = dict(line.split("\t") for line in (tmp_path / "o" / "skipped.txt").read_text().splitlines())
    assert listed == {name: f"{raw}/{name}.json: {message}" for name, (_, message) in SPECIAL.items()}
    assert all(f"  {name}: {message}" in out for name, message in listed.items())
    assert read_meta(tmp_path / "o")["splits"] == {"train": 1, "val": 1}


def test_an_unreadable_test_list_is_a_data_error(shared_data, tmp_path, monkeypatch):
    raw = _copy_subset(shared_data, tmp_path, ["a01_s01_e00_v01", "a12_s10_e01_v03"])
    listed = shutil.copy(shared_data / "nw-ucla" / "val_label.pkl", raw.parent / "val_label.pkl")
    real_open = os.open

    def open_(path, *args, **kwargs):  # as root chmod 000 still reads: refuse the way open() would for a user
        if str(path) == str(listed):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("os.open", open_)
    with pytest.raises(DataFormatError, match=r"val_label\.pkl: cannot open the file: Permission denied$"):
        prepare_nwucla(raw.parent, tmp_path / "o", workers=1, progress=False)


def test_tiny_pretraining_on_real_nwucla_through_the_cli(shared_data, tmp_path, capsys):
    """Real data end to end through both commands: 80 NW-UCLA sequences (6 per action from views 1-2 for
    training, 2 per action from view 3 held out) prepared at 32 frames, then the demo's model pretrained on them
    for 10 epochs at lr 1e-3. The loss falls once the queue holds real keys, and every output file is written."""
    from skelemix.train import main as train

    by_split: dict = {}
    for path in sorted((shared_data / "nw-ucla" / "all_sqe").glob("*.json")):
        by_split.setdefault((path.stem[:3], path.stem.endswith("_v03")), []).append(path.stem)
    names = [n for (_, val), group in sorted(by_split.items()) for n in group[:2 if val else 6]]
    raw = _copy_subset(shared_data, tmp_path, names)
    assert main(["prepare", "nwucla", "--raw", str(raw.parent), "--out", str(tmp_path / "ucla"), "--frames", "32",
                 "--workers", "1"]) == 0
    out = tmp_path / "run"
    settings = [f"data.root={tmp_path / 'ucla'}", "train.batch_size=12", "model.queue_size=48", "train.epochs=10",
                "optim.lr=0.001", "train.knn_interval=5", "train.save_interval=5", "train.linear_epochs=5"]
    assert train(["--no-progress", "--out", str(out)] + [a for s in settings for a in ("--set", s)]) == 0
    printed = capsys.readouterr().out
    assert "pretraining skelemixclr+ on" in printed and "(60 train / 20 val" in printed
    assert "linear evaluation on 20 held-out sequences (10 classes" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["loss"] for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 10 and all(np.isfinite(epochs))
    # The 48-key queue fills with real keys during epoch 1 (5 steps of 12), so epoch 2 is the first whose
    # negatives are all real: the loss must fall from there (by 3.5-4.6% over seeds 0-3 at one thread).
    assert np.mean(epochs[-2:]) < 0.98 * epochs[1], epochs
    assert [r["epoch"] for r in records if r["kind"] == "knn"] == [5, 10]
    assert any(r["kind"] == "linear" for r in records)
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "knn.png", "checkpoints/last.pt", "checkpoints/epoch5.pt",
                 "checkpoints/epoch10.pt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert any((out / "tb").iterdir())


def test_centre_first_is_recorded_and_keeps_the_walk(shared_data, tmp_path):
    """`prepare nwucla --centre first` keeps a walker's path (the shoulder centre moves) and records the choice in
    meta.json, where the checkpoints' data recipe and `skelemix.embed` read it; the default centres every frame."""
    raw = _copy_subset(shared_data, tmp_path, ["a04_s01_e00_v01", "a04_s01_e00_v03"])  # a04: walk around
    for centre in ("frame", "first"):
        assert main(["prepare", "nwucla", "--raw", str(raw.parent), "--out", str(tmp_path / centre), "--frames", "32",
                     "--workers", "1", "--centre", centre, "--no-progress"]) == 0
        assert read_meta(tmp_path / centre)["options"].get("centre", "frame") == centre  # the default: no key
    walk = {c: PreparedDataset(tmp_path / c, "train").data[0, :, :, 2, 0] for c in ("frame", "first")}  # (3, T)
    assert np.abs(walk["frame"]).max() == 0
    floor = walk["first"][[0, 2]] - walk["first"][[0, 2], :1]  # x and z (metres) from the start
    assert np.linalg.norm(floor, axis=0).max() > 0.5, np.linalg.norm(floor, axis=0).max()  # walks around


def test_tuning_split_leaves_the_test_view_out(shared_data, tmp_path):
    """`prepare nwucla --tuning`: view 1 trains, view 2 validates, and no file of the test view 3 is prepared (so
    settings chosen on it never saw the test view); the test-list check, which is about view 3, is skipped."""
    assert main(["prepare", "nwucla", "--raw", str(shared_data / "nw-ucla"), "--out", str(tmp_path / "tune"),
                 "--frames", "16", "--tuning", "--workers", "2", "--no-progress"]) == 0
    files = sorted(p.stem for p in (shared_data / "nw-ucla" / "all_sqe").glob("*.json"))
    meta = read_meta(tmp_path / "tune")
    assert meta["options"]["tuning"] is True
    for split, view in (("train", "_v01"), ("val", "_v02")):
        names = (tmp_path / "tune" / f"{split}_names.txt").read_text().split()
        assert names == [n for n in files if n.endswith(view)] and meta["splits"][split] == len(names)
