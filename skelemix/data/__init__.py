"""Datasets: prepared skeleton arrays and the generated demo data."""
from __future__ import annotations

from torch.utils.data import Dataset

from .prepared import ArrayDataset, PreparedDataset, read_meta, write_meta, write_split
from .synthetic import CLASSES, make_synthetic, write_synthetic

__all__ = ["ArrayDataset", "PreparedDataset", "load_splits", "make_synthetic", "read_meta", "write_meta",
           "write_split", "write_synthetic"]


def load_splits(data_config) -> tuple[Dataset, Dataset]:
    """The (train, val) datasets a :class:`~skelemix.config.DataConfig` names; ``root: synthetic`` generates
    them in memory. The frame count of the data must match ``data_config.frames``."""
    c = data_config
    if c.root == "synthetic":
        train = ArrayDataset(*make_synthetic(c.synthetic_train, frames=c.frames, seed=c.synthetic_seed), CLASSES)
        val = ArrayDataset(*make_synthetic(c.synthetic_val, frames=c.frames, seed=c.synthetic_seed + 1), CLASSES)
        return train, val
    train, val = PreparedDataset(c.root, c.train_split), PreparedDataset(c.root, c.val_split)
    frames = train.data.shape[2]
    if frames != c.frames:
        raise ValueError(f"{c.root}: the prepared data has {frames} frames but data.frames is {c.frames}")
    return train, val
