"""NW-UCLA: preparation of the complete real all_sqe set, the test list check, malformed files."""
import json
import shutil
import time

import numpy as np
import pytest

from skelemix.data import PreparedDataset
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
