import numpy as np
import pytest

from skelemix.data.synthetic import CLASSES, TWO_PERSON, make_synthetic
from skelemix.graph import NTU


def test_shapes_balance_and_determinism():
    data, labels = make_synthetic(44, frames=32, seed=3)
    assert data.shape == (44, 3, 32, 25, 2) and data.dtype == np.float32 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [4] * len(CLASSES)
    again, labels2 = make_synthetic(44, frames=32, seed=3)
    assert np.array_equal(data, again) and np.array_equal(labels, labels2)
    other, _ = make_synthetic(44, frames=32, seed=4)
    assert not np.array_equal(data, other)


def test_bodies_are_centred_on_the_spine_shoulder_and_interactions_have_two():
    data, labels = make_synthetic(66, seed=0)
    assert np.abs(data[:, :, :, NTU.root]).max() == 0  # every body is centred on joint 20 per frame
    present = np.abs(data).sum(axis=(1, 2, 3)) > 0  # (N, M)
    assert present[:, 0].all()
    two = np.isin(labels, [CLASSES.index(c) for c in TWO_PERSON])
    assert present[two, 1].all()
    assert 0 < present[~two, 1].mean() < 1  # some one-person samples carry a bystander
    assert 0.1 < np.abs(data).mean() < 1.0  # metres, not garbage


def test_samples_move():
    data, _ = make_synthetic(22, seed=1)
    motion = np.abs(np.diff(data[..., 0], axis=2)).mean(axis=(1, 2, 3))
    assert (motion > 1e-3).all()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic(10, num_classes=12)
    with pytest.raises(ValueError, match="num_samples"):
        make_synthetic(0)


def test_synth_command_writes_a_prepared_dataset(tmp_path):
    from skelemix.data import PreparedDataset
    from skelemix.data.__main__ import main

    assert main(["synth", "--out", str(tmp_path), "--train", "11", "--val", "5", "--frames", "16"]) == 0
    train, val = PreparedDataset(tmp_path, "train"), PreparedDataset(tmp_path, "val")
    assert len(train) == 11 and len(val) == 5 and train.num_classes == len(CLASSES)
    x, y = train[3]
    assert tuple(x.shape) == (3, 16, 25, 2) and 0 <= y < len(CLASSES)
    assert (tmp_path / "train_names.txt").read_text().count("\n") == 11
    with pytest.raises(ValueError, match="split 'test' not found"):
        PreparedDataset(tmp_path, "test")
