"""``python -m skelemix.evaluate``: linear, kNN, fine-tuning and semi-supervised evaluation (docs/DESIGN.md 6).

::

    python -m skelemix.evaluate linear   --checkpoint RUN/checkpoints/last.pt [--data ROOT] [--view bone]
    python -m skelemix.evaluate knn      --checkpoint RUN/checkpoints/last.pt [--features backbone] [--augment]
    python -m skelemix.evaluate finetune --checkpoint RUN/checkpoints/last.pt [--official-eval-mode]
    python -m skelemix.evaluate semi     --checkpoint RUN/checkpoints/last.pt --fraction 0.01
    python -m skelemix.evaluate ensemble RUN_JOINT/eval_linear RUN_MOTION/eval_linear RUN_BONE/eval_linear

``--checkpoint`` takes a checkpoint of ``python -m skelemix.train``, an official SkeleMixCLR state dict
(architecture from the paper defaults, or ``--config``/``--set``), or ``none`` (random initialisation, the
baseline). Each run writes ``results.json``, ``scores.npy`` (val softmax scores, for ensembles),
``labels.npy``, ``confusion.png`` and ``embedding.png`` into ``--out`` (default ``<checkpoint dir>/../eval_<mode>``).

``linear`` and ``knn`` also run under ``torchrun --nproc_per_node=G -m skelemix.evaluate ...``: each process
encodes a contiguous shard of every split, the features are gathered in order and rank 0 does the rest, so
the results are those of one process (with ``--augment`` the random augmentation draws depend on the split).

The trained probes report the paper's protocol and the clean one side by side (:mod:`skelemix.results`).
Reading checkpoints is :mod:`skelemix.pretrained`, the protocols' settings and fine-tuning
:mod:`skelemix.finetune`, the probes :mod:`skelemix.probe`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from . import cli, distributed, ops
from .augment import VIEWS
from .checkpoint import CLASSIFIER_FORMAT, save_checkpoint
from .config import Config, resolve_device, with_data_input
from .data import load_splits, read_meta
from .data.prepared import coordinates, recipe
from .finetune import PROTOCOLS, FinetuneOptions, Schedule, finetune, loader, semi_protocol
from .models import VARIANTS
from .pretrained import Pretrained, build_encoder, load_pretrained, projection_head
from .probe import AugmentedBatches, balanced_subset, knn_scores, sharded_features, topk_accuracy, train_linear
from .results import confusion_plot, ensemble, print_protocols, protocols, write_results
from .rng import seed_all

# The names other modules and scripts import from here.
__all__ = ["MODES", "Pretrained", "build_encoder", "class_names", "ensemble", "finetune", "load_pretrained",
           "main", "parse_args", "projection_head", "protocols", "run", "with_data"]

MODES = ("linear", "knn", "finetune", "semi", "ensemble")
_KINDS = {"skelemix": "skelemix checkpoint", "classifier": "skelemix classifier", "official": "official checkpoint",
          "state_dict": "state dict", "none": "random initialisation"}


# --------------------------------------------------------------------------------------------- data
def with_data(config: Config, data: str | None = None, view: str | None = None) -> Config:
    """``config`` with its data section pointed at ``data`` (a prepared folder or ``synthetic``) and ``view``;
    for a prepared folder the frame count comes from its ``meta.json``."""
    d = config.data
    root = data or d.root
    frames, meta = d.frames, None
    if root != "synthetic":
        if not Path(root).is_dir():
            where = "" if data else " (the data of the checkpoint's config; pass --data)"
            raise FileNotFoundError(f"data folder not found: {root}{where}. Pass a dataset folder prepared with "
                                    "`python -m skelemix.data`, or 'synthetic'")
        meta = read_meta(root)
        frames = int(meta["frames"])
    config = with_data_input(config, meta, root)  # the layout and channels of the data (or a clear mismatch)
    if view is not None and view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}; got {view!r}")
    return dataclasses.replace(config, data=dataclasses.replace(d, root=root, view=view or d.view, frames=frames))


def class_names(train_set, val_set) -> list[str]:
    """The class names shared by both splits; mismatched class lists or out-of-range labels are errors."""
    classes, val_classes = list(train_set.meta["classes"]), list(val_set.meta["classes"])
    if classes != val_classes:
        raise ValueError(f"mismatched num_classes: the train split has {len(classes)} classes and the val split "
                         f"{len(val_classes)} (or they are named differently)")
    for name, ds in (("train", train_set), ("val", val_set)):
        t = np.asarray(ds.targets)
        if len(t) and (t.min() < 0 or t.max() >= len(classes)):
            raise ValueError(f"mismatched num_classes: the {name} split has label {int(t.max())} but only "
                             f"{len(classes)} classes")
    return classes


# ------------------------------------------------------------------------------------------------ run
@dataclass
class _Evaluation:
    """What every mode shares: the command line, the checkpoint, the config fitted to the data, the splits,
    the output folder and the results so far."""

    args: argparse.Namespace
    pre: Pretrained
    config: Config
    device: torch.device
    seed: int
    workers: int
    impl: str
    train_set: object
    val_set: object
    classes: list[str]
    out: Path
    what: str  # the checkpoint's kind, in words
    result: dict
    start: float

    def loader_of(self, augment_seed: int | None = None):
        """A maker of this evaluation's unshuffled loaders (augmented as the official monitor with a seed)."""
        d, coords = self.config.data, coordinates(self.config.model.channels)

        def make(dataset):
            batches = loader(dataset, self.args.batch_size, self.device, self.workers)
            if augment_seed is None:
                return batches
            return AugmentedBatches(batches, d.shear, d.temporal_ratio, augment_seed, coords)
        return make

    def features(self, encoder, projection: bool = False, augment: bool = False):
        """``(features, labels)`` of the train and of the val split (every rank encodes its shard)."""
        view, layout = self.config.data.view, self.config.model.layout
        return [sharded_features(encoder, ds, self.loader_of(self.seed + i if augment else None), self.device, view,
                                 layout, projection=projection) for i, ds in enumerate((self.train_set, self.val_set))]


@dataclass
class _Outcome:
    """What a mode leaves to write: val scores, labels and features, the trained classifier (or None) and the
    files it wrote itself."""

    scores: np.ndarray
    labels: torch.Tensor
    features: torch.Tensor
    classifier: torch.nn.Module | None = None
    written: tuple[str, ...] = ()


def _prepare(args) -> _Evaluation:
    start = time.perf_counter()
    pre = load_pretrained(args.checkpoint, args.config, args.set)
    config = with_data(pre.config, args.data, args.view)
    device = distributed.init(config.dist.backend, resolve_device(args.device))  # no-op without torchrun
    if distributed.world_size() > 1 and args.mode not in ("linear", "knn"):
        raise ValueError(f"{args.mode} evaluation runs in one process; start it with python -m skelemix.evaluate "
                         "(only linear and knn spread the feature extraction over torchrun processes)")
    seed = config.train.seed if args.seed is None else args.seed
    if args.workers is not None:
        workers = args.workers
    else:  # generated data lives in memory: worker processes would only add start-up time
        workers = 0 if config.data.root == "synthetic" else min(config.train.workers, os.cpu_count() or 1)
    impl = ops.check_impl(args.impl or config.model.impl)
    seed_all(seed)
    train_set, val_set = load_splits(config.data)
    classes = class_names(train_set, val_set)
    out = Path(args.out) if args.out else (Path(pre.path).parent.parent / f"eval_{args.mode}" if pre.path else
                                           Path("runs") / f"eval_{args.mode}_random_init")
    out.mkdir(parents=True, exist_ok=True)
    what = _KINDS[pre.kind] + (f", epoch {pre.epoch}" if pre.epoch is not None else "")
    view = config.data.view
    distributed.print0(f"{args.mode} evaluation of {pre.path or 'none'} ({what}) on {config.data.root} "
                       f"({len(train_set)} train / {len(val_set)} val, {len(classes)} classes), view {view}, device "
                       f"{device}", flush=True)
    result = {"mode": args.mode, "checkpoint": pre.path or "none", "checkpoint_kind": pre.kind,
              "checkpoint_epoch": pre.epoch, "data": config.data.root, "view": view, "classes": classes,
              "num_classes": len(classes), "train_samples": len(train_set), "val_samples": len(val_set), "seed": seed,
              "device": str(device)}
    return _Evaluation(args, pre, config, device, seed, workers, impl, train_set, val_set, classes, out, what, result,
                       start)


def _run_knn(ev: _Evaluation) -> _Outcome | None:
    args, pre, num_classes = ev.args, ev.pre, len(ev.classes)
    projection = args.features == "projection"
    if projection:
        head, dim = projection_head(pre.encoder_state)
        if head is None and pre.encoder_state is not None:
            raise ValueError(f"{pre.path} has no projection head (fc); use --features backbone")
        if head is None:  # random init: the head the config's variant would train
            m = pre.config.model
            head, dim = m.head or VARIANTS[m.variant]["head"], m.feature_dim
        encoder = build_encoder(pre, dim, head=head, keep_fc=True, impl=ev.impl, seed=ev.seed).to(ev.device)
    else:
        encoder = build_encoder(pre, None, impl=ev.impl, seed=ev.seed).to(ev.device)
    (bank, bank_labels), (feats, labels) = ev.features(encoder, projection=projection, augment=args.augment)
    if not distributed.is_main():
        return None
    per_k, votes = {}, {}
    for k in args.k:
        votes[k] = knn_scores(bank, bank_labels, feats, k, num_classes, t=args.t)
        top = topk_accuracy(votes[k], labels)
        per_k[str(k)] = {"top1": top[1], "top5": top[5]}
    k_scores = max(args.k)
    ev.result["knn"] = per_k
    ev.result["settings"] = {"k": list(args.k), "t": args.t, "features": args.features, "augment": args.augment,
                             "scores_k": k_scores, "feature_dim": int(feats.shape[1])}
    print(f"  weighted kNN (t={args.t}) on the {args.features} features"
          f"{' of augmented data (as the official monitor)' if args.augment else ''}:")
    print(f"  {'k':>4}  {'top-1':>6}  {'top-5':>6}")
    for k in args.k:
        print(f"  {k:>4}  {per_k[str(k)]['top1']:6.2f}  {per_k[str(k)]['top5']:6.2f}")
    return _Outcome((votes[k_scores] / votes[k_scores].sum(1, keepdim=True)).numpy(), labels, feats)


def _run_linear(ev: _Evaluation) -> _Outcome | None:
    schedule = _schedule(ev.args, "linear")
    encoder = build_encoder(ev.pre, len(ev.classes), impl=ev.impl, seed=ev.seed).to(ev.device)
    # The official linear evaluation freezes the encoder, keeps it in eval mode during training (BN uses the
    # pretrained running statistics, dropout is off) and feeds it unaugmented data. Its features therefore
    # never change between epochs, and training the classifier on features computed once is exactly the
    # official computation, minus 149 redundant passes through the encoder.
    (tr_f, tr_y), (va_f, va_y) = ev.features(encoder)
    if not distributed.is_main():
        return None
    s = schedule
    fit = train_linear(tr_f, tr_y, va_f, va_y, len(ev.classes), epochs=s.epochs, lr=s.lr, milestones=s.milestones,
                       batch_size=s.batch_size, eval_interval=s.eval_interval, seed=ev.seed, device=ev.device)
    encoder.fc.load_state_dict(fit["fc"].state_dict())
    for h in fit["history"]:
        print(f"  epoch {h['epoch']:>3}/{s.epochs}  top-1 {h['top1']:.2f}%  top-5 {h['top5']:.2f}%")
    settings = {k: v for k, v in s.to_dict().items() if k not in ("weight_decay", "nesterov", "warmup")}
    settings.update(momentum=0.9, frozen=True, eval_mode=True, cached_features=True)
    return _trained(ev, settings, fit["history"], fit["logits"], va_y, va_f, encoder)


def _run_finetune(ev: _Evaluation) -> _Outcome:
    """Fine-tuning on the whole train split, or (``semi``) on a class-balanced labelled fraction of it."""
    args, train_part, written = ev.args, ev.train_set, ()
    if args.mode == "semi":
        if not 0 < args.fraction <= 1:
            raise ValueError(f"--fraction must be in (0, 1]; got {args.fraction}")
        schedule = _schedule(args, semi_protocol(args.fraction))
        targets = np.asarray(ev.train_set.targets)
        subset = balanced_subset(targets, args.fraction, ev.seed)
        train_part = Subset(ev.train_set, subset.tolist())
        np.save(ev.out / "subset_indices.npy", subset)
        written = ("subset_indices.npy",)
        ev.result["subset"] = {"fraction": args.fraction, "seed": ev.seed, "size": int(len(subset)),
                               "per_class": np.bincount(targets[subset], minlength=len(ev.classes)).tolist(),
                               "indices_file": "subset_indices.npy"}
        print(f"  labelled subset: {len(subset)} of {len(ev.train_set)} training samples ({args.fraction:g} per "
              f"class, seed {ev.seed}); indices in {ev.out / 'subset_indices.npy'}")
    else:
        schedule = _schedule(args, "finetune")
    encoder = build_encoder(ev.pre, len(ev.classes), impl=ev.impl, seed=ev.seed).to(ev.device)
    options = FinetuneOptions(args.official_eval_mode, args.clip_grad_norm, ev.workers, ev.seed)
    fit = finetune(encoder, train_part, ev.val_set, schedule, options, device=ev.device, view=ev.config.data.view,
                   layout=ev.config.model.layout, log=lambda m: print(m, flush=True))
    settings = dict(schedule.to_dict(), momentum=0.9, official_eval_mode=args.official_eval_mode,
                    clip_grad_norm=args.clip_grad_norm)
    return _trained(ev, settings, fit["history"], fit["logits"], fit["labels"], fit["features"], encoder, written)


def _trained(ev: _Evaluation, settings: dict, history, logits, labels, features, classifier, written=()) -> _Outcome:
    """The outcome of a trained probe: both protocols in the results and on the screen, softmax scores."""
    ev.result.update(protocols=protocols(history), history=history, settings=settings)
    print_protocols(ev.result["protocols"])
    return _Outcome(torch.softmax(logits.float(), 1).numpy(), labels, features, classifier, written)


def _write(ev: _Evaluation, outcome: _Outcome) -> dict:
    args, labels, written = ev.args, outcome.labels.numpy().astype(np.int64), list(outcome.written)
    if outcome.classifier is not None:
        save_checkpoint({"format": CLASSIFIER_FORMAT, "mode": args.mode, "config": ev.config.to_dict(),
                         "classes": ev.classes, "model": outcome.classifier.state_dict(),
                         "data_recipe": ev.pre.data_recipe or recipe(ev.train_set.meta)}, ev.out / "classifier.pt")
        written.append("classifier.pt")
    plots = None
    if not args.no_plots:
        from .viz import plot_embedding

        view = ev.config.data.view
        label = {"linear": "linear classifier", "knn": f"kNN, k={max(args.k) if args.mode == 'knn' else ''}",
                 "finetune": "fine-tuned", "semi": f"semi-supervised, {getattr(args, 'fraction', '')} labels"}
        plots = {"confusion.png": confusion_plot(labels, outcome.scores, ev.classes, f"{label[args.mode]} ({view})"),
                 "embedding.png": lambda path: plot_embedding(outcome.features.numpy(), labels, ev.classes, path,
                                                              title=f"val features ({view}, {ev.what}), 2-D PCA")}
    return write_results(ev.out, ev.result, outcome.scores, labels, written, plots, start=ev.start)


def _schedule(args, protocol: str) -> Schedule:
    """The protocol's settings with the command line's changes."""
    given = {key: getattr(args, key, None) for key in ("lr", "epochs", "milestones", "weight_decay", "nesterov")}
    given["warmup"] = getattr(args, "warmup_epochs", None)
    if given["milestones"] is not None:
        given["milestones"] = tuple(given["milestones"])
    s = dataclasses.replace(PROTOCOLS[protocol], **{k: v for k, v in given.items() if v is not None},
                            eval_interval=args.eval_interval, batch_size=args.batch_size)
    if s.epochs < 1 or s.lr <= 0 or s.eval_interval < 1:
        raise ValueError(f"--epochs and --eval-interval must be >= 1 and --lr > 0; got {s.epochs}, "
                         f"{s.eval_interval}, {s.lr}")
    return s


_MODES = {"knn": _run_knn, "linear": _run_linear, "finetune": _run_finetune, "semi": _run_finetune}


def run(args) -> dict:
    """Evaluate as ``args`` (parsed by :func:`parse_args`) says; raises on errors. Returns the results dict
    (empty on the ranks other than 0 of a torchrun launch)."""
    if args.mode == "ensemble":
        return ensemble(args.dirs, args.out, plots=not args.no_plots)
    ev = _prepare(args)
    outcome = _MODES[args.mode](ev)
    return {} if outcome is None else _write(ev, outcome)


# ------------------------------------------------------------------------------------------------- CLI
def _common(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint of `python -m skelemix.train`, an official state dict, or 'none' (random init)")
    p.add_argument("--data", default=None, help="prepared dataset folder, or 'synthetic' (default: the checkpoint "
                                                "config's data)")
    p.add_argument("--view", default=None, choices=VIEWS, help="input stream (default: the checkpoint config's)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=None,
                   help="data loader workers (default: the config's, at most the CPU count; 0 for synthetic data)")
    p.add_argument("--seed", type=int, default=None, help="default: the config's train.seed")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint dir>/../eval_<mode>)")
    p.add_argument("--impl", default=None, choices=ops.IMPLS, help="op implementation (default: the config's)")
    p.add_argument("--config", default=None, help="architecture config (YAML) for official checkpoints and 'none'")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, e.g. --set model.hidden_channels=64 (repeatable)")
    p.add_argument("--no-plots", action="store_true", help="skip confusion.png and embedding.png")


def _training(p: argparse.ArgumentParser, finetuning: bool):
    p.add_argument("--epochs", type=int, default=None, help="default: the protocol's")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default: the protocol's)")
    p.add_argument("--milestones", type=int, nargs="*", default=None, help="epochs after which lr *= 0.1")
    p.add_argument("--eval-interval", type=int, default=5, help="evaluate on the val split every N epochs (and "
                                                                "after the last)")
    if finetuning:
        p.add_argument("--weight-decay", type=float, default=None)
        p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
        p.add_argument("--warmup-epochs", type=int, default=None, help="linear warm-up length (finetune: 10)")
        p.add_argument("--official-eval-mode", action="store_true",
                       help="train in eval mode (BN frozen, no dropout) as the official code did")
        p.add_argument("--clip-grad-norm", type=float, default=None, metavar="MAX",
                       help="clip the gradient norm after backward (off by default: the official call was a no-op)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m skelemix.evaluate",
                                description=__doc__.splitlines()[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    linear = sub.add_parser("linear", help="linear classifier on the frozen encoder (lr 3.0, 150 epochs)")
    _common(linear)
    _training(linear, finetuning=False)
    knn = sub.add_parser("knn", help="weighted kNN on frozen features (k 10/20/40, t 0.1)")
    _common(knn)
    knn.add_argument("--k", type=int, nargs="+", default=[10, 20, 40])
    knn.add_argument("--t", type=float, default=0.1, help="temperature of the exp(sim / t) weights")
    knn.add_argument("--features", choices=("projection", "backbone"), default="projection",
                     help="the 128-d projection (the official monitor) or the pooled backbone feature")
    knn.add_argument("--augment", action="store_true",
                     help="augment bank and test data (shear 0.5, temporal shift) as the official monitor did")
    ft = sub.add_parser("finetune", help="fine-tune the whole network (lr 0.1, nesterov, 110 epochs)")
    _common(ft)
    _training(ft, finetuning=True)
    semi = sub.add_parser("semi", help="fine-tune on a class-balanced labelled fraction of the train split")
    _common(semi)
    _training(semi, finetuning=True)
    semi.add_argument("--fraction", type=float, default=0.1, help="labelled fraction per class (0.1 or 0.01)")
    ens = sub.add_parser("ensemble", help="average the saved softmax scores of several evaluations")
    ens.add_argument("dirs", nargs="+", help="output folders of earlier evaluations")
    ens.add_argument("--out", default=None, help="output folder (default: <common parent>/eval_ensemble)")
    ens.add_argument("--no-plots", action="store_true")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    if args.mode in ("linear", "finetune", "semi", "knn") and args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.mode == "knn" and (min(args.k) < 1 or args.t <= 0):
        p.error("--k must be >= 1 and --t > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def evaluate() -> int:
        run(args)
        distributed.cleanup()
        return 0

    return cli.run(evaluate, debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
