"""Continuing a pretraining run from its checkpoint (``--resume``): which config and checkpoint, what the
checkpoint must hold, and the random streams and counters it restores."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import cli, distributed
from .checkpoint import PRETRAIN_FORMAT, CheckpointError, load_checkpoint, reading_part, require_parts
from .config import Config, build_config, load_config
from .rng import seed_all, set_rng_state

# What --resume needs from a checkpoint (older checkpoints lack the optional "epoch_sums" / "epoch_seconds").
RESUME_PARTS = ("config", "model", "optimizer", "epoch", "step_in_epoch", "global_step", "rng")
POSITION = ("epoch", "step_in_epoch", "global_step")  # completed epochs, steps of the current epoch, steps


def run_config(config_file, resume: str | None, out: str | None, overrides: list[str],
               notes: list[str] | None = None) -> tuple[Config, Path | None]:
    """The run's config and the checkpoint to resume (None for a new run). Without ``config_file``, ``resume``
    "last" takes the config of the run in ``out``, and a checkpoint path the config saved in that checkpoint."""
    if resume and resume != "last" and config_file is None:
        ckpt = load_checkpoint(resume)
        require_parts(ckpt, resume, ("config",), "resume from it")
        return build_config(ckpt["config"], overrides, notes), Path(resume)
    if resume and config_file is None:
        out = Path(out or load_config().train.out)
        if not (out / "config.yaml").is_file():
            raise FileNotFoundError(f"nothing to resume in {out}: it has no config.yaml, so no run was started there "
                                    "(pass the --out of the run to resume, or start one without --resume)")
        config_file = out / "config.yaml"
    config = load_config(config_file, overrides, notes)
    if resume != "last":
        return config, Path(resume) if resume else None
    path = Path(config.train.out) / "checkpoints" / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume in {config.train.out}: {path} does not exist (the run stopped "
                                "before its first checkpoint was complete); start the run again without --resume")
    return config, path


def read_resume_checkpoint(path: Path, device: torch.device) -> dict:
    """A pretraining checkpoint with every part :data:`RESUME_PARTS` names and a valid position."""
    ckpt = load_checkpoint(path, map_location=device)
    if not isinstance(ckpt, dict) or ckpt.get("format") != PRETRAIN_FORMAT:
        raise CheckpointError(f"{path} is not a skelemix pretraining checkpoint (format {PRETRAIN_FORMAT})")
    require_parts(ckpt, path, RESUME_PARTS, "resume from it")
    position = [ckpt[k] for k in POSITION]
    if not all(isinstance(v, int) and v >= 0 for v in position):
        raise CheckpointError(f"{path}: expected counts >= 0 for epoch, step_in_epoch and global_step; got "
                              f"{cli.short(position)}")
    return ckpt


def check_batch_change(path: Path, ckpt: dict, batch_size: int) -> None:
    """The epoch position and queue pointer of a checkpoint count global batches of its run: another number
    of processes is fine when it divides the global batch (checked by the trainer); another global batch is
    fine only at an epoch boundary with a queue pointer on a multiple of it."""
    with reading_part(path, "config"):
        old = ckpt["config"]["train"]["batch_size"]
    if old == batch_size:
        return
    with reading_part(path, "model"):
        ptr = int(ckpt["model"]["queue_ptr"])
    if ckpt["step_in_epoch"] or ptr % batch_size:
        raise CheckpointError(
            f"cannot resume {path} with train.batch_size {batch_size}: it was trained with global batch {old} and "
            + (f"stopped inside an epoch (step {ckpt['step_in_epoch']}), whose remaining batches are batches of "
               f"{old}" if ckpt["step_in_epoch"] else f"its queue pointer ({ptr}) is not a multiple of {batch_size}")
            + f". Resume with train.batch_size={old}; the number of processes may change if it divides {old}")
    distributed.print0(f"note: the global batch changes from {old} to {batch_size} at this epoch boundary", flush=True)


@dataclass
class Position:
    """Where a run stands, saved in every checkpoint under these field names: completed epochs, steps of the
    current epoch, steps in all, and the current epoch's running sums of the logged values and its training
    seconds so far, so that an epoch cut by a resume is summarised as if it had not been."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)
    epoch_seconds: float = 0.0

    def add_step(self, parts: dict[str, float], epoch_seconds: float) -> None:
        self.step_in_epoch += 1
        self.global_step += 1
        for k, v in parts.items():
            self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
        self.epoch_seconds = epoch_seconds

    def end_epoch(self) -> tuple[dict[str, float], float]:
        """The finished epoch's means of the logged values and its seconds; the position moves to the next."""
        means = {k: v / max(self.step_in_epoch, 1) for k, v in self.epoch_sums.items()}
        summary = means, self.epoch_seconds
        self.epoch, self.step_in_epoch, self.epoch_sums, self.epoch_seconds = self.epoch + 1, 0, {}, 0.0
        return summary

    @classmethod
    def from_checkpoint(cls, path: Path, ckpt: dict) -> "Position":
        sums = ckpt.get("epoch_sums")
        if sums is None and ckpt["step_in_epoch"]:
            distributed.print0(f"note: {path} holds no running sums of epoch {ckpt['epoch'] + 1} (an older "
                               "checkpoint): that epoch's summary averages only the steps after this resume",
                               flush=True)
        with reading_part(path, "epoch_sums"):
            return cls(*(ckpt[k] for k in POSITION), {str(k): float(v) for k, v in (sums or {}).items()},
                       float(ckpt.get("epoch_seconds", 0.0)))


def restore_rng(path: Path, ckpt: dict, generator: torch.Generator, seed: int, global_step: int) -> None:
    """This rank's random streams as the checkpoint saved them; when it was written by another number of
    processes, fresh per-rank streams, distinct from the run's start."""
    rank, world = distributed.rank(), distributed.world_size()
    states = ckpt.get("rng_ranks", [ckpt["rng"]])
    if len(states) == world:
        with reading_part(path, "rng"):
            set_rng_state(states[rank], generator)
        return
    fresh = distributed.rank_seed(seed + 7919 * (global_step + 1), rank)
    generator.manual_seed(fresh)
    seed_all(fresh)
    distributed.print0(
        f"note: {path} was written by {len(states)} process(es) and this run has {world}: the weights, "
        "optimizer, queue and data order continue exactly, but the random streams (augmentation, mixing, "
        "dropout) are re-seeded, so the run does not replay the one it continues bit for bit", flush=True)
