"""How a pretraining run's batches reach the device: indexed from a copy of the training set resident on the
device (``train.data_placement``), or loaded by a DataLoader; this rank's share of each global batch."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import distributed
from .config import Config, ConfigError
from .data import load_splits


class TrainingData:
    """The training and validation sets of a run, its resumable sampler and this rank's batches."""

    def __init__(self, config: Config, local_batch: int, device: torch.device):
        t = config.train
        self.train_set, self.val_set = load_splits(config.data)
        if len(self.train_set) < t.batch_size:
            raise ConfigError(f"train.batch_size ({t.batch_size}) exceeds the {len(self.train_set)} training samples")
        self.local_batch, self.device, self.workers = local_batch, device, t.workers
        # No pinning thread under train.cuda_graph=on: its CUDA calls (host allocations, event queries) while
        # the step is captured would invalidate the capture.
        self.pin_memory = device.type == "cuda" and t.cuda_graph != "on"
        self.sampler = distributed.ResumableDistributedSampler(self.train_set, t.batch_size, distributed.world_size(),
                                                               distributed.rank(), seed=t.seed)
        self.resident = _resident_copy(self.train_set, t.data_placement, device)

    def loader(self, dataset, sampler=None, batch_size: int | None = None, drop_last: bool = False) -> DataLoader:
        # Its own generator: creating an iterator would otherwise draw from the global RNG (a worker base
        # seed), so a resumed run would see different dropout draws than an uninterrupted one.
        return DataLoader(dataset, batch_size=batch_size or self.local_batch, shuffle=False, drop_last=drop_last,
                          sampler=sampler, num_workers=self.workers, pin_memory=self.pin_memory,
                          generator=torch.Generator().manual_seed(0))

    def batches(self):
        """This rank's batches of the epoch set in ``self.sampler`` (from its start step), on the device."""
        if self.resident is None:
            for x, _ in self.loader(self.train_set, self.sampler, drop_last=True):
                yield x.to(self.device, non_blocking=True)
            return
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long, device=self.device)
        for start in range(0, len(order) - self.local_batch + 1, self.local_batch):
            yield self.resident[order[start:start + self.local_batch]]


def _resident_copy(dataset, placement: str, device: torch.device) -> torch.Tensor | None:
    """The training arrays as one tensor on the device (``train.data_placement``), or None for a DataLoader."""
    if placement == "host" or not hasattr(dataset, "data"):
        return None
    nbytes = len(dataset) * int(np.prod(dataset.data.shape[1:])) * 4
    if placement == "auto":
        if device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes > free // 2:
            distributed.print0(f"note: the training set ({nbytes / 2**30:.1f} GiB) stays on the host: it "
                               f"needs more than half of the device's free memory ({free / 2**30:.1f} GiB)")
            return None
    return torch.from_numpy(np.asarray(dataset.data[dataset.indices], dtype=np.float32)).to(device)
