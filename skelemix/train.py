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

The trainer orchestrates; its parts are the modules batches (data), optim, graphed (the captured step),
resume (checkpoints), probe (kNN monitor, final linear probe) and metrics (metrics.jsonl, TensorBoard).
"""
from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from . import cli, distributed, ops
from .augment import apply_augment, draw_augment, to_view
from .batches import TrainingData
from .checkpoint import PRETRAIN_FORMAT, reading_part, remove_temporaries, save_checkpoint
from .config import (Config, ConfigError, describe_batch_and_lr, describe_variant, list_configs,
                     make_pretrain_model, resolve_device, with_data_input)
from .data.prepared import coordinates, recipe
from .graphed import GraphedStep, tree_map
from .metrics import MetricsLog, append_record, keep_records_until
from .optim import lr_at, make_optimizer, set_capturable, set_lr
from .probe import knn_monitor, query_encoder_vs_random_init
from .resume import Position, check_batch_change, read_resume_checkpoint, restore_rng, run_config
from .rng import rng_state, seed_all

__all__ = ["GraphedStep", "Trainer", "lr_at", "main", "parse_args"]  # GraphedStep, lr_at: their old home


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
    p.add_argument("--impl", choices=ops.IMPLS, help="= --set model.impl=IMPL: kernel implementation of the model")
    p.add_argument("--out", help="= --set train.out=DIR")
    p.add_argument("--max-steps", type=int, help="stop after this many steps in total (with a checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")
    cli.add_debug_flag(p)
    return p.parse_args(argv)


def _cli_overrides(args) -> list[str]:
    pairs = [("train.epochs", args.epochs), ("train.batch_size", args.batch_size), ("train.workers", args.workers),
             ("train.seed", args.seed), ("train.device", args.device), ("model.impl", args.impl),
             ("train.out", args.out)]
    return args.overrides + [f"{k}={v}" for k, v in pairs if v is not None]


class Trainer:
    """Pretraining in one process, or in every process of a torch.distributed group (``distributed.init``):
    each rank then trains on its share of the global batch through DistributedDataParallel."""

    def __init__(self, config: Config, progress: bool = True):
        t = config.train
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.progress = progress and self.rank == 0
        self.device, self.local_batch = _device_and_local_batch(config, self.world)
        self.out = Path(t.out)
        seed_all(t.seed)
        # Augmentation and mixing draw from their own CPU generator, so they are the same on every device
        # and their state is saved with the checkpoints. Each rank has its own stream (rank 0: the seed).
        self.generator = torch.Generator().manual_seed(distributed.rank_seed(t.seed, self.rank))
        self.data = TrainingData(config, self.local_batch, self.device)
        self.train_set, self.val_set, self.sampler = self.data.train_set, self.data.val_set, self.data.sampler
        # The skeleton layout and input channels come from the data (model.layout / model.channels "auto").
        self.config = config = with_data_input(config, self.train_set.meta, config.data.root)
        self.model = _pretrain_model(config, self.world, self.device)
        self.net = distributed.wrap(self.model, self.device)  # DistributedDataParallel under torchrun
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, config)
        self.steps_per_epoch = len(self.train_set) // t.batch_size  # drop_last, as the official loader
        # The captured step's device work must not synchronise with the host (sync_free; tests also set it
        # without a graph, to run that code path uncaptured).
        self.graphed = GraphedStep(self._forward, self.optimizer, self.device) if t.cuda_graph == "on" else None
        self.sync_free = self.graphed is not None
        self.metrics = MetricsLog(self.out, writer=self.rank == 0)
        self.position = Position()

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The checkpoint (a collective under torch.distributed: it gathers every rank's random states)."""
        rng = distributed.all_gather_object(rng_state(self.generator))
        return {"format": PRETRAIN_FORMAT, "config": self.config.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), **asdict(self.position), "rng": rng[0],
                "world_size": self.world, "rng_ranks": rng,
                "data_recipe": recipe(self.train_set.meta)}  # how new inputs are prepared for the encoder

    def save(self, name: str = "last.pt") -> Path:
        """Every rank calls this; rank 0 writes (the model and optimizer are the same on every rank)."""
        state, path = self.state_dict(), self.out / "checkpoints" / name
        if self.rank == 0:
            save_checkpoint(state, path)
        return path

    def load(self, path: Path):
        """Continue from the checkpoint at ``path``: weights, optimizer, position, running sums, random streams."""
        ckpt = read_resume_checkpoint(path, self.device)
        check_batch_change(path, ckpt, self.config.train.batch_size)
        with reading_part(path, "model"):
            self.model.load_state_dict(ckpt["model"])
        with reading_part(path, "optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
        set_capturable(self.optimizer, self.graphed is not None, self.device)
        self.position = Position.from_checkpoint(path, ckpt)
        if self.graphed is not None:  # a captured graph would still point at the replaced optimizer state
            self.graphed.reset()
        restore_rng(path, ckpt, self.generator, self.config.train.seed, self.position.global_step)
        if self.rank == 0:  # records written after this checkpoint belong to steps that will be redone
            keep_records_until(self.metrics.path, self.position.global_step)

    def leave_process_group(self):
        """Drop the DistributedDataParallel wrapper, then leave the process group (see distributed.cleanup)."""
        self.net = self.model
        distributed.cleanup()

    # ----------------------------------------------------------------------------------------- step
    def _draws(self, shape) -> dict:
        """Every random draw of one step, made on the host from ``self.generator`` in the order the step uses
        them: the query's augmentation, the key's, then the SkeleMix partners and regions."""
        d = self.config.data
        coords = coordinates(self.config.model.channels)
        return {"q": draw_augment(shape, d.shear, d.temporal_ratio, self.generator, coords),
                "k": draw_augment(shape, d.shear, d.temporal_ratio, self.generator, coords),
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
            _check_finite(parts, self.position, " (train.cuda_graph=on checks after the replay: this step's update "
                                                "is applied)")
            return parts
        out = self._forward(x, tree_map(lambda t: t.to(self.device, non_blocking=True), draws))
        # The logged values are means over the ranks (each rank's loss is the mean over its equal share), and
        # every rank sees them, so a non-finite loss on any rank stops all of them at the same step.
        parts = dict(zip(out, distributed.mean_over_ranks(torch.stack([v.detach().float() for v in out.values()]))
                         .tolist()))
        _check_finite(parts, self.position)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.optimizer.step()
        return parts

    # ----------------------------------------------------------------------------------------- loop
    def fit(self, max_steps: int | None = None) -> str:
        """Train to the configured number of epochs; returns "done", "stopped" (max_steps) or "interrupted"."""
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
            remove_temporaries(self.out / "checkpoints")  # of saves killed mid-write
        self.metrics.open(new_run=self.position.global_step == 0)
        try:
            with cli.ctrl_c_flag() as interrupted:
                while self.position.epoch < self.config.train.epochs:
                    if not self._epoch(interrupted, max_steps):
                        self.save()
                        return "stopped"
        except KeyboardInterrupt:
            path = self.save()
            launcher = "torchrun ... " if self.world > 1 else "python "
            distributed.print0(f"\ninterrupted at step {self.position.global_step}; saved {path}. Continue with: "
                               f"{launcher}-m skelemix.train --config {self.out / 'config.yaml'} --resume", flush=True)
            return "interrupted"
        finally:
            self.metrics.close()
        return "done"

    def _epoch(self, interrupted: threading.Event, max_steps: int | None) -> bool:
        """Train the rest of the current epoch, then summarise, monitor and save it; False when ``max_steps``
        stopped it first. Ctrl-C (on any rank) raises KeyboardInterrupt between steps."""
        t, pos = self.config.train, self.position
        epoch, lr = pos.epoch + 1, lr_at(self.config, pos.epoch + 1)
        set_lr(self.optimizer, lr)
        self.sampler.set_epoch(epoch, pos.step_in_epoch)  # resumes mid-epoch at the same batch
        start = time.perf_counter() - pos.epoch_seconds  # the epoch's time includes that before a resume
        with cli.StepProgress(self.steps_per_epoch, pos.step_in_epoch, f"epoch {epoch}/{t.epochs}",
                              self.progress) as bar:
            for x in self.data.batches():
                if distributed.any_rank(interrupted.is_set(), self.device):
                    raise KeyboardInterrupt
                if max_steps is not None and pos.global_step >= max_steps:
                    return False
                parts = self.train_step(x)
                pos.add_step(parts, time.perf_counter() - start)
                self.metrics.write({"kind": "step", "epoch": epoch, "global_step": pos.global_step, **parts})
                bar.step(parts["loss"], t.batch_size)
        means, seconds = pos.end_epoch()
        knn = self.knn_monitor() if t.knn_interval and (epoch % t.knn_interval == 0 or epoch == t.epochs) else None
        distributed.print0(self.metrics.end_epoch(epoch, t.epochs, pos.global_step, lr, means, seconds, knn),
                           flush=True)
        self.save()
        if t.save_interval and epoch % t.save_interval == 0:
            self.save(f"epoch{epoch}.pt")
        return True

    # ----------------------------------------------------------------------------------------- probes
    def knn_monitor(self) -> dict:
        c, t = self.config, self.config.train
        return knn_monitor(self.model.encoder_q, self.train_set, self.val_set,
                           lambda ds: self.data.loader(ds, batch_size=max(t.batch_size, 128)), self.device,
                           c.data.view, c.model.layout, t.knn_k, t.knn_t)


def _check_finite(parts: dict, pos: Position, note: str = ""):
    if not math.isfinite(parts["loss"]):
        raise FloatingPointError(f"the loss became {parts['loss']} at step {pos.global_step + 1} (epoch "
                                 f"{pos.epoch + 1}); stopping instead of training on garbage. Lower "
                                 f"optim.lr or check the data for NaN/inf values{note}")


# --------------------------------------------------------------------------------------------- set-up
def _device_and_local_batch(config: Config, world: int) -> tuple[torch.device, int]:
    """The device of this process and its share of the global batch, or a ConfigError saying what cannot run."""
    t = config.train
    device = resolve_device(t.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank())
    try:
        ops.check_impl_available(config.model.impl, device)
    except RuntimeError as err:  # an impl this install or device lacks: the user's choice
        raise ConfigError(f"model.impl: {err}") from None
    # train.cuda_graph "auto" is off until a GPU run has validated the captured step (as train.amp).
    if t.cuda_graph == "on" and device.type != "cuda":
        raise ConfigError(f"train.cuda_graph=on: expected a CUDA device; got device {device}")
    if t.cuda_graph == "on" and world > 1:
        raise ConfigError(f"train.cuda_graph=on: expected one process; got {world} (DistributedDataParallel's "
                          "gradient all-reduce and the key all-gather are not captured)")
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size ({t.batch_size}) is the global batch and must be divisible by the "
                          f"number of processes ({world})")
    return device, t.batch_size // world


def _pretrain_model(config: Config, world: int, device: torch.device):
    """The SkeleMixCLR model on ``device``, the same initial weights on every rank; then each rank's own random
    streams, and the BatchNorm mode of ``dist.bn``."""
    t = config.train
    model = make_pretrain_model(config)  # the same seed on every rank: the same initial weights
    if model.mixers and t.batch_size // world < 2:
        raise ConfigError(f"SkeleMix draws partners within each process's batch, which needs at least 2 samples; "
                          f"train.batch_size {t.batch_size} over {world} processes gives {t.batch_size // world}")
    if world > 1:
        seed_all(distributed.rank_seed(t.seed, distributed.rank()))  # dropout and other global draws differ
        if config.dist.bn == "sync":
            model = distributed.convert_sync_batchnorm(model, device)
        model.shuffle_key_bn = config.dist.bn == "shuffle"
    return model.to(device)


# --------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_configs:
        print("\n".join(list_configs()))
        return 0
    return cli.run(lambda: _pretrain(args), debug=args.debug)


def _pretrain(args) -> int:
    notes = []
    config, resume = run_config(args.config, args.resume, args.out, _cli_overrides(args), notes)
    distributed.init(config.dist.backend, resolve_device(config.train.device))  # no-op without torchrun
    for note in notes:
        distributed.print0(f"note: {note}", file=sys.stderr, flush=True)
    trainer = Trainer(config, progress=not args.no_progress)
    if resume is not None:
        trainer.load(resume)
        pos = trainer.position
        distributed.print0(f"resumed from {resume}: epoch {pos.epoch}, step {pos.global_step}", flush=True)
        if pos.epoch >= config.train.epochs:
            distributed.print0(f"note: {resume} has finished all {config.train.epochs} epochs: nothing to train "
                               "(pass a larger --epochs to train on)", flush=True)
    distributed.print0(_start_line(trainer), flush=True)
    start = time.perf_counter()
    status = trainer.fit(max_steps=args.max_steps)  # an exception here ends this process; torchrun ends the others
    trainer.leave_process_group()  # plots and the final linear evaluation below need no other rank
    if status == "interrupted":
        return 130
    if trainer.rank != 0:
        return 0
    if status == "stopped":
        print(f"stopped after {trainer.position.global_step} steps (--max-steps); continue with --resume", flush=True)
        return 0
    _report(trainer, time.perf_counter() - start)
    return 0


def _start_line(trainer: Trainer) -> str:
    c = trainer.config
    n_params = sum(p.numel() for p in trainer.params)
    return (f"pretraining {describe_variant(c)} on {c.data.root} ({len(trainer.train_set)} train / "
            f"{len(trainer.val_set)} val, view {c.data.view}), {n_params:,} trainable parameters, device "
            f"{trainer.device}, impl {c.model.impl}, data "
            f"{'resident on the device' if trainer.data.resident is not None else 'through a DataLoader'}, "
            f"amp {c.train.amp}, cuda_graph {c.train.cuda_graph}, output {trainer.out}\n"
            f"{describe_batch_and_lr(c, trainer.world)}")


def _report(trainer: Trainer, elapsed: float) -> None:
    """The plots, the closing line and (``train.final_linear_eval``) the linear probe, recorded in metrics.jsonl."""
    from .viz import plot_curves

    out, metrics = trainer.out, trainer.metrics.path  # absent when a finished checkpoint went into a new --out
    plots = plot_curves(metrics, out) if metrics.is_file() else []
    wrote = [p.name for p in plots] + (["checkpoints"] if (out / "checkpoints" / "last.pt").is_file() else [])
    print(f"pretraining done in {elapsed:.0f}s ({trainer.position.global_step} steps); wrote "
          f"{', '.join(wrote) or 'nothing'} in {out}", flush=True)
    if not trainer.config.train.final_linear_eval:
        return
    results = query_encoder_vs_random_init(trainer.model, trainer.config,
                                           lambda ds: trainer.data.loader(ds, batch_size=128), trainer.train_set,
                                           trainer.val_set, trainer.device)
    classes = trainer.train_set.num_classes
    print(f"\nlinear evaluation on {len(trainer.val_set)} held-out sequences ({classes} classes, chance "
          f"{100 / classes:.1f}%):")
    for name, r in results.items():
        print(f"  {name:<12} top-1 {r['last']:5.1f}%")
    gain = results["pretrained"]["last"] - results["random init"]["last"]
    print(f"  {describe_variant(trainer.config)} pretraining gain over random init: {gain:+.1f} points")
    append_record(metrics, {"kind": "linear", "global_step": trainer.position.global_step,
                            **{k: v["last"] for k, v in results.items()}})


if __name__ == "__main__":
    raise SystemExit(main())
