"""``python -m skelemix.train``: SkeleMixCLR pretraining.

With no arguments it runs the built-in demo (``configs/demo.yaml``): SkeleMixCLR+ on generated skeleton
actions, sized for a laptop CPU, ending with the linear-evaluation accuracy of the pretrained encoder next
to the same encoder at random initialisation. With ``--config`` it runs a shipped or user config
(``--list-configs`` shows the shipped ones), e.g. the paper's NTU-60 x-view setting.

Outputs in ``train.out``: ``config.yaml`` (resolved), ``metrics.jsonl``, TensorBoard events in ``tb/``,
``checkpoints/last.pt`` (every epoch and on Ctrl-C) and ``checkpoints/epochN.pt`` (every ``save_interval``),
and ``loss.png`` / ``knn.png`` at the end. ``--resume`` continues exactly where a run stopped: the same steps,
losses and epoch summaries as a run that was never stopped. A new run in a folder starts its ``metrics.jsonl``
anew. Mistakes end in one ``error:`` line (``--debug`` shows the traceback).

``torchrun --nproc_per_node=G -m skelemix.train ...`` trains on G processes with DistributedDataParallel
(``train.batch_size`` stays the global batch; see ``skelemix/distributed.py`` and the ``dist`` config section).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Subset

from . import cli, distributed, ops
from .augment import apply_augment, draw_augment, to_view
from .checkpoint import (PRETRAIN_FORMAT, CheckpointError, load_checkpoint, reading_part, remove_temporaries,
                         require_parts, save_checkpoint)
from .config import (Config, ConfigError, base_lr, build_config, describe_batch_and_lr, describe_variant, list_configs,
                     load_config, make_encoder, make_pretrain_model, resolve_device, with_data_input)
from .data import load_splits
from .data.prepared import coordinates, recipe
from .models import init_weights
from .probe import extract_features, knn_accuracy, train_linear
from .viz import read_metrics

# What --resume needs from a checkpoint (older checkpoints lack the optional "epoch_sums" / "epoch_seconds").
RESUME_PARTS = ("config", "model", "optimizer", "epoch", "step_in_epoch", "global_step", "rng")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m skelemix.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (a path or the name of a shipped config); default: the demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=10 (repeatable)")
    p.add_argument("--resume", nargs="?", const="last", metavar="CHECKPOINT",
                   help="continue a run: from <out>/checkpoints/last.pt (with <out>/config.yaml), or from the given "
                        "checkpoint (with the config saved in it); --config and --set change the config")
    p.add_argument("--epochs", type=int, help="= --set train.epochs=N")
    p.add_argument("--batch-size", type=int, help="= --set train.batch_size=N (the global batch under torchrun)")
    p.add_argument("--workers", type=int, help="= --set train.workers=N")
    p.add_argument("--seed", type=int, help="= --set train.seed=N")
    p.add_argument("--device", help="= --set train.device=DEV (auto, cpu, cuda, cuda:N)")
    p.add_argument("--impl", choices=ops.IMPLS, help="kernel implementation for the whole model")
    p.add_argument("--out", help="= --set train.out=DIR")
    p.add_argument("--max-steps", type=int, help="stop after this many steps in total (with a checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")
    cli.add_debug_flag(p)
    return p.parse_args(argv)


def _cli_overrides(args) -> list[str]:
    pairs = [("train.epochs", args.epochs), ("train.batch_size", args.batch_size), ("train.workers", args.workers),
             ("train.seed", args.seed), ("train.device", args.device), ("train.impl", args.impl),
             ("train.out", args.out)]
    return args.overrides + [f"{k}={v}" for k, v in pairs if v is not None]


def lr_at(config: Config, epoch: int) -> float:
    """Step schedule of the official code: base * 0.1^(number of steps passed); ``epoch`` is 1-based. The base
    is ``optim.lr`` or, with ``optim.lr_scaling: linear``, scaled by the global batch."""
    return base_lr(config) * 0.1 ** sum(epoch > s for s in config.optim.steps)


def _rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": random.getstate()}


def _set_rng_state(state: dict, generator: torch.Generator):
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class Trainer:
    """Pretraining in one process, or in every process of a torch.distributed group (``distributed.init``):
    each rank then trains on its share of the global batch through DistributedDataParallel."""

    def __init__(self, config: Config, progress: bool = True):
        self.config = config
        t = config.train
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.progress = progress and self.rank == 0
        self.device = resolve_device(t.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", distributed.local_rank())
        try:
            ops.check_impl_available(t.impl, self.device)
        except RuntimeError as err:  # an impl this install or device lacks: the user's choice
            raise ConfigError(f"train.impl: {err}") from None
        # train.cuda_graph "auto" is off until a GPU run has validated the captured step (as train.amp).
        if t.cuda_graph == "on" and self.device.type != "cuda":
            raise ConfigError(f"train.cuda_graph=on: expected a CUDA device; got device {self.device}")
        if t.cuda_graph == "on" and self.world > 1:
            raise ConfigError(f"train.cuda_graph=on: expected one process; got {self.world} (DistributedDataParallel's "
                              "gradient all-reduce and the key all-gather are not captured)")
        if t.batch_size % self.world:
            raise ConfigError(f"train.batch_size ({t.batch_size}) is the global batch and must be divisible by the "
                              f"number of processes ({self.world})")
        self.local_batch = t.batch_size // self.world
        self.out = Path(t.out)
        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        random.seed(t.seed)
        # Augmentation and mixing draw from their own CPU generator, so they are the same on every device
        # and their state is saved with the checkpoints. Each rank has its own stream (rank 0: the seed).
        self.generator = torch.Generator().manual_seed(distributed.rank_seed(t.seed, self.rank))
        self.train_set, self.val_set = load_splits(config.data)
        # The skeleton layout and input channels come from the data (model.layout / model.channels "auto").
        self.config = config = with_data_input(config, self.train_set.meta, config.data.root)
        if len(self.train_set) < t.batch_size:
            raise ConfigError(f"train.batch_size ({t.batch_size}) exceeds the {len(self.train_set)} training samples")
        model = make_pretrain_model(config)  # the same seed on every rank: the same initial weights
        if model.mixers and self.local_batch < 2:
            raise ConfigError(f"SkeleMix draws partners within each process's batch, which needs at least 2 samples; "
                              f"train.batch_size {t.batch_size} over {self.world} processes gives {self.local_batch}")
        if self.world > 1:
            seed = distributed.rank_seed(t.seed, self.rank)  # dropout and other global draws differ per rank
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            if config.dist.bn == "sync":
                model = distributed.convert_sync_batchnorm(model, self.device)
            model.shuffle_key_bn = config.dist.bn == "shuffle"
        self.model = model.to(self.device)
        self.net = distributed.wrap(self.model, self.device)  # DistributedDataParallel under torchrun
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = config.optim
        self.optimizer = (torch.optim.SGD(self.params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                          nesterov=o.nesterov) if o.name == "sgd" else
                          # Captured AdamW keeps its step counters on the device (capturable=True).
                          torch.optim.AdamW(self.params, lr=o.lr, weight_decay=o.weight_decay,
                                            capturable=t.cuda_graph == "on"))
        self.steps_per_epoch = len(self.train_set) // t.batch_size  # drop_last, as the official loader
        self.sampler = distributed.ResumableDistributedSampler(self.train_set, t.batch_size, self.world, self.rank,
                                                               seed=t.seed)
        self.resident = self._make_resident()
        # The captured step's device work must not synchronise with the host (sync_free; tests also set it
        # without a graph, to run that code path uncaptured).
        self.graphed = GraphedStep(self._forward, self.optimizer, self.device) if t.cuda_graph == "on" else None
        self.sync_free = self.graphed is not None
        self.epoch = 0  # completed epochs
        self.step_in_epoch = 0  # completed steps of the current epoch
        self.global_step = 0
        # The current epoch's running sums of the logged loss parts and its training time so far: saved with
        # the checkpoints, so that an epoch cut by a resume is summarised as if it had not been.
        self.epoch_sums: dict[str, float] = {}
        self.epoch_seconds = 0.0

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The checkpoint (a collective under torch.distributed: it gathers every rank's random states)."""
        rng = distributed.all_gather_object(_rng_state(self.generator))
        return {"format": PRETRAIN_FORMAT, "config": self.config.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "rng": rng[0], "world_size": self.world, "rng_ranks": rng,
                "epoch_sums": dict(self.epoch_sums), "epoch_seconds": self.epoch_seconds,
                "data_recipe": recipe(self.train_set.meta)}  # how new inputs are prepared for the encoder

    def save(self, name: str = "last.pt") -> Path:
        """Every rank calls this; rank 0 writes (the model and optimizer are the same on every rank)."""
        state, path = self.state_dict(), self.out / "checkpoints" / name
        if self.rank == 0:
            save_checkpoint(state, path)
        return path

    def load(self, path: Path):
        ckpt = load_checkpoint(path, map_location=self.device)
        if not isinstance(ckpt, dict) or ckpt.get("format") != PRETRAIN_FORMAT:
            raise CheckpointError(f"{path} is not a skelemix pretraining checkpoint (format {PRETRAIN_FORMAT})")
        require_parts(ckpt, path, RESUME_PARTS, "resume from it")
        position = [ckpt[k] for k in ("epoch", "step_in_epoch", "global_step")]
        if not all(isinstance(v, int) and v >= 0 for v in position):
            raise CheckpointError(f"{path}: expected counts >= 0 for epoch, step_in_epoch and global_step; got "
                                  f"{cli.short(position)}")
        self._check_resumable(path, ckpt)
        with reading_part(path, "model"):
            self.model.load_state_dict(ckpt["model"])
        with reading_part(path, "optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self._set_capturable()
        self.epoch, self.step_in_epoch, self.global_step = position
        sums = ckpt.get("epoch_sums")
        if sums is None and self.step_in_epoch:
            distributed.print0(f"note: {path} holds no running sums of epoch {self.epoch + 1} (an older checkpoint): "
                               "that epoch's summary averages only the steps after this resume", flush=True)
        with reading_part(path, "epoch_sums"):
            self.epoch_sums = {str(k): float(v) for k, v in (sums or {}).items()}
            self.epoch_seconds = float(ckpt.get("epoch_seconds", 0.0))
        if self.graphed is not None:  # a captured graph would still point at the replaced optimizer state
            self.graphed.reset()
        states = ckpt.get("rng_ranks", [ckpt["rng"]])
        if len(states) == self.world:
            with reading_part(path, "rng"):
                _set_rng_state(states[self.rank], self.generator)
        else:  # no stream to continue for some ranks: fresh per-rank streams, distinct from the run's start
            seed = distributed.rank_seed(self.config.train.seed + 7919 * (self.global_step + 1), self.rank)
            self.generator.manual_seed(seed)
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            distributed.print0(
                f"note: {path} was written by {len(states)} process(es) and this run has {self.world}: the weights, "
                "optimizer, queue and data order continue exactly, but the random streams (augmentation, mixing, "
                "dropout) are re-seeded, so the run does not replay the one it continues bit for bit", flush=True)
        if self.rank != 0:
            return
        # Records written after this checkpoint belong to steps that will be redone.
        metrics = self.out / "metrics.jsonl"
        if metrics.exists():
            records = read_metrics(metrics)
            if not all(isinstance(r.get("global_step", 0), int) for r in records):
                raise ValueError(f"{metrics}: a record's global_step is not an integer; move the file away to resume")
            keep = [r for r in records if r.get("global_step", 0) <= self.global_step]
            metrics.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def _set_capturable(self):
        """AdamW's ``capturable`` (and where its step counters live) as this run needs, whatever the run that
        wrote the checkpoint used: on the device under train.cuda_graph=on, else on the host."""
        capturable = self.graphed is not None
        for group in self.optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = capturable
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(self.device if capturable else "cpu", torch.float32)

    def _check_resumable(self, path: Path, ckpt: dict):
        """The epoch position and queue pointer of a checkpoint count global batches of its run: another number
        of processes is fine when it divides the global batch (checked in __init__); another global batch is
        fine only at an epoch boundary with a queue pointer on a multiple of it."""
        with reading_part(path, "config"):
            old, new = ckpt["config"]["train"]["batch_size"], self.config.train.batch_size
        if old == new:
            return
        with reading_part(path, "model"):
            ptr = int(ckpt["model"]["queue_ptr"])
        if ckpt["step_in_epoch"] or ptr % new:
            raise CheckpointError(
                f"cannot resume {path} with train.batch_size {new}: it was trained with global batch {old} and "
                + (f"stopped inside an epoch (step {ckpt['step_in_epoch']}), whose remaining batches are batches of "
                   f"{old}" if ckpt["step_in_epoch"] else f"its queue pointer ({ptr}) is not a multiple of {new}")
                + f". Resume with train.batch_size={old}; the number of processes may change if it divides {old}")
        distributed.print0(f"note: the global batch changes from {old} to {new} at this epoch boundary", flush=True)

    def leave_process_group(self):
        """Drop the DistributedDataParallel wrapper, then leave the process group (see distributed.cleanup)."""
        self.net = self.model
        distributed.cleanup()

    # ----------------------------------------------------------------------------------------- loop
    def _make_resident(self) -> torch.Tensor | None:
        """The training arrays as one tensor on the device (``train.data_placement``), or None for a DataLoader."""
        mode, ds = self.config.train.data_placement, self.train_set
        if mode == "host" or not hasattr(ds, "data"):
            return None
        nbytes = len(ds) * int(np.prod(ds.data.shape[1:])) * 4
        if mode == "auto":
            if self.device.type != "cuda":
                return None
            free, _ = torch.cuda.mem_get_info(self.device)
            if nbytes > free // 2:
                distributed.print0(f"note: the training set ({nbytes / 2**30:.1f} GiB) stays on the host: it "
                                   f"needs more than half of the device's free memory ({free / 2**30:.1f} GiB)")
                return None
        return torch.from_numpy(np.asarray(ds.data[ds.indices], dtype=np.float32)).to(self.device)

    def _train_batches(self):
        """This rank's batches of the epoch set in ``self.sampler`` (from its start step), on the device."""
        if self.resident is None:
            for x, _ in self._loader(self.train_set, self.sampler, drop_last=True):
                yield x.to(self.device, non_blocking=True)
            return
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long, device=self.device)
        for start in range(0, len(order) - self.local_batch + 1, self.local_batch):
            yield self.resident[order[start:start + self.local_batch]]

    def _loader(self, dataset, sampler=None, batch_size=None, drop_last=False):
        t = self.config.train
        # Its own generator: creating an iterator would otherwise draw from the global RNG (a worker base
        # seed), so a resumed run would see different dropout draws than an uninterrupted one.
        return DataLoader(dataset, batch_size=batch_size or self.local_batch, shuffle=False, drop_last=drop_last,
                          sampler=sampler, num_workers=t.workers,
                          # No pinning thread under train.cuda_graph=on: its CUDA calls (host allocations, event
                          # queries) while the step is captured would invalidate the capture.
                          pin_memory=self.device.type == "cuda" and self.graphed is None,
                          generator=torch.Generator().manual_seed(0))

    def _log(self, record: dict):
        if self.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("kind", "epoch", "global_step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{record['kind']}/{key}", value, record.get("global_step", 0))

    def _draws(self, shape) -> dict:
        """Every random draw of one step, made on the host from ``self.generator`` in the order the step uses
        them: the query's augmentation, the key's, then the SkeleMix partners and regions."""
        c = self.config
        coords = coordinates(c.model.channels)
        return {"q": draw_augment(shape, c.data.shear, c.data.temporal_ratio, self.generator, coords),
                "k": draw_augment(shape, c.data.shear, c.data.temporal_ratio, self.generator, coords),
                "mix": self.model.draw_mixes(shape, self.generator)}

    def _forward(self, x: torch.Tensor, draws: dict) -> dict:
        """The step's device work up to the losses, from the batch and the draws (both on the device)."""
        c = self.config
        views = [to_view(apply_augment(x, draws[name]), c.data.view, c.model.layout) for name in ("q", "k")]
        # No autocast weight cache inside a captured graph (torch's CUDA graph notes); the values are the same.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.train.amp == "bf16",
                            cache_enabled=False if self.sync_free else None):
            return self.net(views[0], views[1], generator=self.generator, mix_draws=draws["mix"])

    def train_step(self, x: torch.Tensor) -> dict:
        x = x.to(self.device, non_blocking=True)
        draws = self._draws(x.shape)
        if self.graphed is not None:
            parts = self.graphed(x, draws)
            self._check_finite(parts, " (train.cuda_graph=on checks after the replay: this step's update is applied)")
            return parts
        out = self._forward(x, _tree_map(lambda t: t.to(self.device, non_blocking=True), draws))
        # The logged values are means over the ranks (each rank's loss is the mean over its equal share), and
        # every rank sees them, so a non-finite loss on any rank stops all of them at the same step.
        parts = dict(zip(out, distributed.mean_over_ranks(torch.stack([v.detach().float() for v in out.values()]))
                         .tolist()))
        self._check_finite(parts)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.optimizer.step()
        return parts

    def _check_finite(self, parts: dict, note: str = ""):
        if not math.isfinite(parts["loss"]):
            raise FloatingPointError(f"the loss became {parts['loss']} at step {self.global_step + 1} (epoch "
                                     f"{self.epoch + 1}); stopping instead of training on garbage. Lower "
                                     f"optim.lr or check the data for NaN/inf values{note}")

    def _features(self, encoder, dataset, batch_size: int, projection: bool = False):
        """``extract_features`` of the whole dataset; under torch.distributed each rank encodes a contiguous
        shard and the shards are gathered in order, so every rank gets the one-process result."""
        if self.world > 1:
            dataset = Subset(dataset, list(distributed.shard(len(dataset))))
        f, y = extract_features(encoder, self._loader(dataset, batch_size=batch_size), self.device,
                                self.config.data.view, self.config.model.layout, projection=projection)
        return distributed.gather_rows(f), distributed.gather_rows(y)

    def knn_monitor(self) -> dict:
        t = self.config.train
        encoder = self.model.encoder_q
        distributed.broadcast_buffers(encoder)  # rank 0's BN statistics (those in the checkpoint) everywhere
        feats = [self._features(encoder, ds, max(t.batch_size, 128), projection=True)
                 for ds in (self.train_set, self.val_set)]
        acc = knn_accuracy(*feats[0], *feats[1], ks=t.knn_k, num_classes=self.train_set.num_classes, t=t.knn_t)
        return {f"knn@{k}": v for k, v in acc.items()}

    def fit(self, max_steps: int | None = None) -> str:
        """Train to the configured number of epochs; returns "done", "stopped" (max_steps) or "interrupted"."""
        c, t = self.config, self.config.train
        self.tb = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(c.to_dict(), sort_keys=False))
            metrics = self.out / "metrics.jsonl"
            if self.global_step == 0 and metrics.is_file() and metrics.stat().st_size:
                print(f"note: {metrics} held the records of an earlier run in this folder; this run starts it anew "
                      "(--resume continues a run instead)", file=sys.stderr, flush=True)
                metrics.write_text("")
            remove_temporaries(self.out / "checkpoints")  # of saves killed mid-write
            self.tb = _summary_writer(self.out / "tb")
        # Ctrl-C finishes the current step, saves a checkpoint and stops; a second Ctrl-C aborts at once.
        interrupted = threading.Event()
        previous = None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                interrupted.set()
                signal.signal(signal.SIGINT, previous)
            previous = signal.signal(signal.SIGINT, on_sigint)
        bar = _NoBar()
        try:
            while self.epoch < t.epochs:
                epoch = self.epoch + 1
                lr = lr_at(c, epoch)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.sampler.set_epoch(epoch, self.step_in_epoch)  # resumes mid-epoch at the same batch
                bar = _progress(self.steps_per_epoch, self.step_in_epoch, f"epoch {epoch}/{t.epochs}", self.progress)
                session_start, session_steps = time.perf_counter(), 0
                start = session_start - self.epoch_seconds  # the epoch's time includes that before a resume
                for x in self._train_batches():
                    if distributed.any_rank(interrupted.is_set(), self.device):
                        raise KeyboardInterrupt
                    if max_steps is not None and self.global_step >= max_steps:
                        bar.close()
                        self.save()
                        return "stopped"
                    parts = self.train_step(x)
                    self.step_in_epoch += 1
                    self.global_step += 1
                    session_steps += 1
                    for k, v in parts.items():
                        self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
                    self.epoch_seconds = time.perf_counter() - start
                    self._log({"kind": "step", "epoch": epoch, "global_step": self.global_step, **parts})
                    rate = session_steps * t.batch_size / (time.perf_counter() - session_start)
                    bar.set_postfix(loss=f"{parts['loss']:.3f}", samples_per_s=f"{rate:.0f}")
                    bar.update(1)
                bar.close()
                means = {k: v / max(self.step_in_epoch, 1) for k, v in self.epoch_sums.items()}
                record = {"kind": "epoch", "epoch": epoch, "global_step": self.global_step, "lr": lr, **means,
                          "seconds": self.epoch_seconds}
                self.epoch, self.step_in_epoch, self.epoch_sums, self.epoch_seconds = epoch, 0, {}, 0.0
                self._log(record)
                line = f"epoch {epoch}/{t.epochs}  loss {means.get('loss', math.nan):.4f}  " \
                       f"(ins {means.get('loss_ins', math.nan):.3f}, p {means.get('loss_p', math.nan):.3f}, " \
                       f"c {means.get('loss_c', math.nan):.3f})  lr {lr:g}  {record['seconds']:.1f}s"
                if t.knn_interval and (epoch % t.knn_interval == 0 or epoch == t.epochs):
                    knn = self.knn_monitor()
                    self._log({"kind": "knn", "epoch": epoch, "global_step": self.global_step, **knn})
                    line += "  kNN " + " ".join(f"{k}={v:.1f}%" for k, v in knn.items())
                distributed.print0(line, flush=True)
                self.save()
                if t.save_interval and epoch % t.save_interval == 0:
                    self.save(f"epoch{epoch}.pt")
        except KeyboardInterrupt:
            bar.close()
            path = self.save()
            launcher = "torchrun ... " if self.world > 1 else "python "
            distributed.print0(f"\ninterrupted at step {self.global_step}; saved {path}. Continue with: "
                               f"{launcher}-m skelemix.train --config {self.out / 'config.yaml'} --resume", flush=True)
            return "interrupted"
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if self.tb is not None:
                self.tb.close()
        return "done"

    def linear_eval(self) -> dict:
        """Linear accuracy (%) of the pretrained encoder_q and of the same architecture at random init.

        A fair random-init baseline needs two things the official protocol lacks: its BatchNorm statistics are
        recomputed on the training data (at init they are 0/1 and, with the official weight init, shrink the
        eval-mode features to ~1e-7), and all features are standardised with the training statistics before the
        linear classifier, so the probe measures what the features separate rather than their scale.
        """
        c, t = self.config, self.config.train
        n_cls = self.train_set.num_classes
        pretrained = make_encoder(c.model).to(self.device)
        state = {k[len("encoder_q."):]: v for k, v in self.model.state_dict().items()
                 if k.startswith("encoder_q.") and not k.startswith("encoder_q.fc.")}
        pretrained.load_state_dict(state)
        torch.manual_seed(t.seed)
        random_init = make_encoder(c.model).to(self.device)
        random_init.apply(init_weights)
        calibrate_batchnorm(random_init, self._loader(self.train_set, batch_size=128), self.device, c.data.view,
                            c.model.layout)
        features = {}
        for name, encoder in (("pretrained", pretrained), ("random init", random_init)):
            features[name] = [extract_features(encoder, self._loader(ds, batch_size=128), self.device, c.data.view,
                                               c.model.layout) for ds in (self.train_set, self.val_set)]
        results = {}
        for name, ((f_train, y_train), (f_val, y_val)) in features.items():
            mean, std = f_train.mean(0), f_train.std(0) + 1e-12
            results[name] = train_linear((f_train - mean) / std, y_train, (f_val - mean) / std, y_val, n_cls,
                                         epochs=t.linear_epochs, lr=0.1, milestones=(int(0.8 * t.linear_epochs),),
                                         seed=t.seed)
        return results


class GraphedStep:
    """A training step's device work as one CUDA graph: ``forward(x, draws)`` (a dict of 0-d tensors with
    ``"loss"``), its backward and ``optimizer.step()``, replayed by every call with new ``x`` and ``draws``.

    The whole-network recipe of torch's CUDA graph notes: ``warmup`` steps run eagerly on a side stream, then
    the step is captured on that same stream with the gradients set to None first, so the captured backward
    allocates them in the graph's pool and every replay rewrites them (static gradients, nothing to zero).
    Every call is a real training step, the warm-up ones included. ``x`` and every tensor of ``draws`` are
    copied into static device buffers before the graph runs, so ``forward`` must read nothing else from the
    host and never synchronise. The graph bakes in the learning rates (SGD reads ``lr`` as a Python float; a
    tensor lr would be read with ``.item()``), so it is captured again when they change (at epoch boundaries).
    Draws from the default CUDA generator (dropout) stay random: capture registers that generator with the
    graph and every replay advances its offset.
    """

    def __init__(self, forward, optimizer: torch.optim.Optimizer, device: torch.device, warmup: int = 3):
        self.forward, self.optimizer, self.device, self.warmup = forward, optimizer, device, warmup
        self.stream = torch.cuda.Stream(device)
        self.reset()

    def reset(self):
        """Forget the graph and its buffers (the next calls warm up and capture again)."""
        self.graph = self.lrs = self.static = self.parts = self.keys = None
        self.steps = 0

    def _step(self) -> torch.Tensor:
        out = self.forward(*self.static)
        out["loss"].backward()
        self.optimizer.step()
        self.keys = list(out)
        return torch.stack([v.detach().float() for v in out.values()])

    def __call__(self, x: torch.Tensor, draws) -> dict:
        """One training step; returns the values of ``forward``'s outputs after it (a synchronisation)."""
        with torch.cuda.device(self.device):
            if self.static is None:
                self.static = _tree_map(lambda t: torch.empty_like(t, device=self.device), (x, draws))
            for buf, value in zip(_leaves(self.static), _leaves((x, draws))):
                if buf.shape != value.shape or buf.dtype != value.dtype:
                    raise ValueError(f"a captured step needs inputs of fixed shapes and dtypes: got {value.dtype} "
                                     f"{tuple(value.shape)} for a buffer of {buf.dtype} {tuple(buf.shape)}")
                buf.copy_(value, non_blocking=True)
            lrs = [group["lr"] for group in self.optimizer.param_groups]
            if self.graph is not None and lrs != self.lrs:
                self.graph = None  # captured again below with the new learning rates
            current = torch.cuda.current_stream()
            if self.graph is None and self.steps < self.warmup:
                self.stream.wait_stream(current)
                with torch.cuda.stream(self.stream), warnings.catch_warnings():
                    # A capturable optimizer (AdamW) warns when it steps uncaptured: here that is the point.
                    warnings.filterwarnings("ignore", message=".*capturable=True.*")
                    self.optimizer.zero_grad(set_to_none=True)
                    parts = self._step()
                current.wait_stream(self.stream)
            else:
                if self.graph is None:
                    self.optimizer.zero_grad(set_to_none=True)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream):
                        self.parts = self._step()
                    self.graph, self.lrs = graph, lrs
                self.graph.replay()
                parts = self.parts
            self.steps += 1
            return dict(zip(self.keys, parts.tolist()))


def _tree_map(fn, tree):
    """``fn`` applied to every tensor of nested dicts, lists and tuples."""
    if isinstance(tree, dict):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tree_map(fn, v) for v in tree)
    return fn(tree)


def _leaves(tree) -> list:
    out = []
    _tree_map(out.append, tree)
    return out


@torch.no_grad()
def calibrate_batchnorm(encoder, loader, device, view: str, layout: str):
    """Recompute every BatchNorm's running statistics as the plain average over ``loader`` (no weight changes)."""
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    encoder.train()
    for x, _ in loader:
        encoder.feature_map(to_view(x.to(device), view, layout))
    for m in norms:
        m.momentum = 0.1
    encoder.eval()


def _summary_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("note: tensorboard is not installed; no TensorBoard events are written", file=sys.stderr)
        return None
    return SummaryWriter(str(path))


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False, dynamic_ncols=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_configs:
        print("\n".join(list_configs()))
        return 0
    return cli.run(lambda: _pretrain(args), debug=args.debug)


def _run_config(args) -> tuple[Config, Path | None]:
    """The run's config and the checkpoint to resume (None for a new run). Without ``--config``, ``--resume``
    takes the config of the run in ``--out``, and ``--resume PATH`` the config saved in that checkpoint."""
    overrides = _cli_overrides(args)
    if args.resume and args.resume != "last" and args.config is None:
        ckpt = load_checkpoint(args.resume)
        require_parts(ckpt, args.resume, ("config",), "resume from it")
        return build_config(ckpt["config"], overrides), Path(args.resume)
    if args.resume and args.config is None:
        out = Path(args.out or load_config().train.out)
        if not (out / "config.yaml").is_file():
            raise FileNotFoundError(f"nothing to resume in {out}: it has no config.yaml, so no run was started there "
                                    "(pass the --out of the run to resume, or start one without --resume)")
        args.config = out / "config.yaml"
    config = load_config(args.config, overrides)
    if args.resume != "last":
        return config, Path(args.resume) if args.resume else None
    path = Path(config.train.out) / "checkpoints" / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume in {config.train.out}: {path} does not exist (the run stopped "
                                "before its first checkpoint was complete); start the run again without --resume")
    return config, path


def _pretrain(args) -> int:
    config, resume = _run_config(args)
    distributed.init(config.dist.backend, resolve_device(config.train.device))  # no-op without torchrun
    trainer = Trainer(config, progress=not args.no_progress)
    if resume is not None:
        trainer.load(resume)
        distributed.print0(f"resumed from {resume}: epoch {trainer.epoch}, step {trainer.global_step}", flush=True)
        if trainer.epoch >= config.train.epochs:
            distributed.print0(f"note: {resume} has finished all {config.train.epochs} epochs: nothing to train "
                               "(pass a larger --epochs to train on)", flush=True)
    n_params = sum(p.numel() for p in trainer.params)
    distributed.print0(f"pretraining {describe_variant(config)} on {config.data.root} ({len(trainer.train_set)} "
                       f"train / {len(trainer.val_set)} val, view {config.data.view}), {n_params:,} trainable "
                       f"parameters, device {trainer.device}, impl {config.train.impl}, data "
                       f"{'resident on the device' if trainer.resident is not None else 'through a DataLoader'}, "
                       f"amp {config.train.amp}, cuda_graph {config.train.cuda_graph}, output {trainer.out}\n"
                       f"{describe_batch_and_lr(config, trainer.world)}", flush=True)
    start = time.perf_counter()
    status = trainer.fit(max_steps=args.max_steps)  # an exception here ends this process; torchrun ends the others
    trainer.leave_process_group()  # plots and the final linear evaluation below need no other rank
    if trainer.rank != 0:
        return 130 if status == "interrupted" else 0
    if status == "interrupted":
        return 130
    if status == "stopped":
        print(f"stopped after {trainer.global_step} steps (--max-steps); continue with --resume", flush=True)
        return 0
    elapsed = time.perf_counter() - start
    from .viz import plot_curves

    metrics = trainer.out / "metrics.jsonl"  # absent when a finished checkpoint was resumed into a new --out
    plots = plot_curves(metrics, trainer.out) if metrics.is_file() else []
    wrote = [p.name for p in plots] + (["checkpoints"] if (trainer.out / "checkpoints" / "last.pt").is_file() else [])
    print(f"pretraining done in {elapsed:.0f}s ({trainer.global_step} steps); wrote {', '.join(wrote) or 'nothing'} in "
          f"{trainer.out}", flush=True)
    if config.train.final_linear_eval:
        results = trainer.linear_eval()
        print(f"\nlinear evaluation on {len(trainer.val_set)} held-out sequences "
              f"({trainer.train_set.num_classes} classes, chance {100 / trainer.train_set.num_classes:.1f}%):")
        for name, r in results.items():
            print(f"  {name:<12} top-1 {r['last']:5.1f}%")
        gain = results["pretrained"]["last"] - results["random init"]["last"]
        print(f"  {describe_variant(config)} pretraining gain over random init: {gain:+.1f} points")
        with open(metrics, "a") as f:
            f.write(json.dumps({"kind": "linear", "global_step": trainer.global_step,
                                **{k: v["last"] for k, v in results.items()}}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
