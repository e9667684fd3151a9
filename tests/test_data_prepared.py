"""Prepared splits holding NaN or inf are refused when opened for training or evaluation, naming the file, the
split and the first bad sample."""
import subprocess
import sys

import numpy as np
import pytest

from skelemix.config import build_config
from skelemix.data import PreparedDataset, load_splits, prepared, write_synthetic
from skelemix.data.errors import DataFormatError


def _poke(root, split, index, value, where=(0, 2, 5, 0)):
    data = np.load(root / f"{split}_data.npy", mmap_mode="r+")
    data[(index, *where)] = value
    data.flush()


@pytest.fixture
def root(tmp_path):
    write_synthetic(tmp_path / "data", 24, 12, frames=64, seed=0)
    return tmp_path / "data"


@pytest.mark.parametrize("mmap", [True, False])
def test_nan_and_inf_are_named_with_split_sample_and_value(root, mmap, monkeypatch):
    for split in ("train", "val"):
        PreparedDataset(root, split, mmap=mmap)  # clean data passes
    _poke(root, "val", 7, np.nan)
    _poke(root, "train", 1, np.inf, where=(2, 15, 24, 1))
    _poke(root, "train", 20, -np.inf)  # a later one: only the first is named
    sample = 3 * 64 * 25 * 2 * 4
    for chunk in (prepared._CHECK_CHUNK, 3 * sample, 1):  # all in one chunk; 3 a chunk (7 in the third); one each
        monkeypatch.setattr(prepared, "_CHECK_CHUNK", chunk)
        with pytest.raises(DataFormatError, match=r"val_data\.npy: split 'val': sample 7 holds nan \(channel 0, "
                                                  r"frame 2, joint 5, body 0\); prepared data must be finite"):
            PreparedDataset(root, "val", mmap=mmap)
        with pytest.raises(DataFormatError, match=r"train_data\.npy: split 'train': sample 1 holds inf \(channel 2, "
                                                  r"frame 15, joint 24, body 1\)"):
            PreparedDataset(root, "train", mmap=mmap)
    _poke(root, "train", 1, 0.0, where=(2, 15, 24, 1))
    monkeypatch.setattr(prepared, "_CHECK_CHUNK", 5 * sample)  # sample 20 starts the last, partial chunk
    with pytest.raises(DataFormatError, match=r"split 'train': sample 20 holds -inf"):
        PreparedDataset(root, "train", mmap=mmap)
    assert len(PreparedDataset(root, "val", mmap=mmap, check=False)) == 12


def test_training_and_evaluation_refuse_a_bad_split(root):
    _poke(root, "train", 1, np.inf)
    _poke(root, "val", 7, np.nan)
    config = build_config({"data": {"root": str(root)}})
    with pytest.raises(DataFormatError, match=r"split 'train': sample 1 holds inf"):
        load_splits(config.data)
    tiny = ["--set", "model.hidden_channels=4", "--set", "model.hidden_dim=16", "--set", "model.feature_dim=8"]
    commands = {
        "train": [sys.executable, "-m", "skelemix.train", "--set", f"data.root={root}",
                  "--out", str(root.parent / "run"), "--no-progress", *tiny],
        "evaluate": [sys.executable, "-m", "skelemix.evaluate", "knn", "--checkpoint", "none", "--data", str(root),
                     "--out", str(root.parent / "eval"), "--no-plots", "--device", "cpu", *tiny],
    }
    for bad in ("train inf", "val nan"):
        if bad == "val nan":
            _poke(root, "train", 1, 0.0)
        for name, command in commands.items():
            proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
            split, value = bad.split()
            assert proc.returncode != 0, (name, proc.stdout, proc.stderr)
            assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, (name, proc.stderr)
            assert f"{split}_data.npy: split '{split}': sample {1 if split == 'train' else 7} holds {value}" \
                in proc.stderr, (name, proc.stderr)
