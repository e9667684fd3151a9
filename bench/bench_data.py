"""One epoch of pretraining input (two augmented views per sample, delivered on the device): the official-style
pipeline (per-sample numpy shear and temporal crop in DataLoader workers, docs/DESIGN.md 1.5) against ours (the
dataset resident on the device, batched augmentation there). Model steps are excluded: they are measured in
bench_model.py; this isolates what the data path costs per epoch."""
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from bench.common import BATCH, DEVICE, SIZE, measure
from skelemix.augment import pretrain_augment

SAMPLES = {"paper": 40080, "cpu": 1024}[SIZE]  # NTU-60 x-sub has 40,080 training sequences
SHAPE = (3, 64, 25, 2)


def _official_shear(x, rng, r=0.5):
    s1 = [rng.uniform(-r, r), rng.uniform(-r, r), rng.uniform(-r, r)]
    s2 = [rng.uniform(-r, r), rng.uniform(-r, r), rng.uniform(-r, r)]
    S = np.array([[1, s1[0], s2[0]], [s1[1], 1, s2[1]], [s1[2], s2[2], 1]])
    C, T, V, M = x.shape
    return np.dot(S, x.reshape(C, -1)).reshape(C, T, V, M).astype(np.float32)


def _official_crop(x, rng, ratio=6):
    p = x.shape[1] // ratio
    padded = np.pad(x, ((0, 0), (p, p), (0, 0), (0, 0)), mode="symmetric")
    start = rng.integers(0, 2 * p + 1)
    return padded[:, start:start + x.shape[1]]


class _OfficialStyle(Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        views = [_official_crop(_official_shear(self.data[i], rng), rng) for _ in range(2)]
        return torch.from_numpy(np.ascontiguousarray(views[0])), torch.from_numpy(np.ascontiguousarray(views[1]))


@pytest.mark.parametrize("provider", ["official-style", "device-resident"])
def test_epoch_of_views(benchmark, provider):
    data = np.random.default_rng(0).standard_normal((SAMPLES, *SHAPE), dtype=np.float32)
    if provider == "official-style":
        workers = min(4, os.cpu_count() or 1)
        loader = DataLoader(_OfficialStyle(data), batch_size=BATCH, shuffle=True, drop_last=True,
                            num_workers=workers, pin_memory=DEVICE.type == "cuda", persistent_workers=True)

        def epoch():
            for q, k in loader:
                q.to(DEVICE, non_blocking=True), k.to(DEVICE, non_blocking=True)
    else:
        resident = torch.from_numpy(data).to(DEVICE)
        generator = torch.Generator().manual_seed(0)

        def epoch():
            order = torch.randperm(SAMPLES, generator=generator).to(DEVICE)
            for start in range(0, SAMPLES - BATCH + 1, BATCH):
                x = resident[order[start:start + BATCH]]
                pretrain_augment(x, generator=generator), pretrain_augment(x, generator=generator)

    measure(benchmark, epoch, group="data/epoch of two views", provider=provider,
            shapes={"samples": SAMPLES, "sample": list(SHAPE), "batch": BATCH},
            bytes=2 * SAMPLES * int(np.prod(SHAPE)) * 4, rounds=3, warmup=1)
