"""``python -m skelemix.evaluate``: linear, kNN, fine-tuning and semi-supervised evaluation (REFERENCE.md 6).

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

Two protocols are reported side by side for the trained probes. The paper's number is the best test top-1 over
the evaluations every five epochs, i.e. model selection on the test set (REFERENCE.md 8, quirk 15); the clean
number is the top-1 after the last epoch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from . import cli, distributed, ops
from .augment import VIEWS, pretrain_augment, to_view
from .checkpoint import (CLASSIFIER_FORMAT, PRETRAIN_FORMAT, CheckpointError, load_checkpoint, load_official,
                         require_parts, save_checkpoint)
from .config import Config, build_config, load_yaml, make_encoder, resolve_device, with_data_input
from .data.prepared import coordinates, recipe
from .models import VARIANTS, init_weights
from .probe import balanced_subset, extract_features, knn_scores, topk_accuracy, train_linear

MODES = ("linear", "knn", "finetune", "semi", "ensemble")
PAPER = "best test top-1 over the periodic evaluations (model selection on the test set, as the paper reports)"
CLEAN = "top-1 after the last epoch"
# Official encoder_q sub-modules that the official evaluation ignores besides fc (REFERENCE.md 6.1).
_OFFICIAL_EXTRAS = ("Ap", "global_head.", "local_head.", "global_mlps.", "tem_local_mlps.", "spa_local_mlps.")

# Optimisation defaults of each protocol (REFERENCE.md 6.1, 6.3, 6.4); the semi rows are the released
# configs for 1% and 10% labels. ``warmup``: lr = base * epoch / warmup for epochs 1 .. warmup - 1.
PROTOCOLS = {
    "linear": dict(lr=3.0, epochs=150, milestones=[80], weight_decay=0.0, nesterov=False, warmup=0),
    "finetune": dict(lr=0.1, epochs=110, milestones=[50, 70, 90], weight_decay=1e-4, nesterov=True, warmup=10),
    "semi-0.1": dict(lr=0.1, epochs=150, milestones=[80], weight_decay=1e-4, nesterov=False, warmup=0),
    "semi-0.01": dict(lr=0.05, epochs=150, milestones=[40], weight_decay=0.0, nesterov=False, warmup=0),
}


# ------------------------------------------------------------------------------------------ checkpoints
@dataclass
class Pretrained:
    """What evaluation needs from a checkpoint: the architecture and the encoder weights."""

    kind: str  # "skelemix" | "classifier" | "official" | "state_dict" | "none"
    path: str | None
    config: Config
    encoder_state: dict | None  # encoder_q weights with this package's names (fc.* included when present)
    epoch: int | None = None
    data_recipe: dict | None = None  # how the training samples were made (skelemix.data.prepared.recipe)


def _strip(sd: Mapping, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _describe(obj) -> str:
    if isinstance(obj, Mapping):
        keys = [str(k) for k in obj]
        more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
        return f"a dict with keys {keys[:8]}{more}"
    return f"an object of type {type(obj).__name__}"


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _eval_config(config_file: str | None, overrides: list[str] | None) -> Config:
    """The config of a checkpoint that carries none: defaults (the paper's architecture) or ``config_file``,
    plus ``overrides``. Mixing rows play no part in evaluation, so unless given they are emptied: the
    released 7-11 block regions would otherwise reject data shorter than 44 frames."""
    raw = load_yaml(config_file) if config_file else {}
    given = "swap_params" in (raw.get("model") or {}) or any(o.split("=", 1)[0].strip() == "model.swap_params"
                                                            for o in overrides or [])
    if not given:
        raw = {**raw, "model": {**(raw.get("model") or {}), "swap_params": []}}
    return build_config(raw, overrides)


def load_pretrained(checkpoint: str | os.PathLike | None, config_file: str | None = None,
                    overrides: list[str] | None = None) -> Pretrained:
    """Read a checkpoint and tell which kind it is from its contents.

    * ``none`` (or None): no weights; the config is ``Config()`` defaults (the paper's architecture), or
      ``config_file``, plus ``overrides``.
    * A ``skelemix-pretrain/1`` checkpoint of the trainer: its own config (plus ``overrides``) and the
      ``encoder_q.*`` weights.
    * A ``skelemix-classifier/1`` file written by this module: its config and encoder.
    * An official SkeleMixCLR state dict (``encoder_q.st_gcn_networks...``, optionally ``module.``-prefixed,
      pretraining or linear-eval/fine-tune): converted with :func:`skelemix.checkpoint.load_official`; the
      architecture comes from the defaults / ``config_file`` / ``overrides`` as for ``none``.
    * A raw state dict with this package's names (``encoder_q.blocks...``): like an official one.
    """
    if checkpoint is None or str(checkpoint) == "none":
        return Pretrained("none", None, _eval_config(config_file, overrides), None)
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (pass a checkpoint of `python -m skelemix.train` "
                                "such as RUN/checkpoints/last.pt, an official SkeleMixCLR state dict, or 'none' "
                                "for a randomly initialised encoder)")
    obj = load_checkpoint(path)
    if isinstance(obj, Mapping) and "format" in obj:
        fmt = obj["format"]
        if fmt not in (PRETRAIN_FORMAT, CLASSIFIER_FORMAT):
            raise CheckpointError(f"{path}: checkpoint format {cli.short(fmt)} is neither a pretraining checkpoint "
                                  f"({PRETRAIN_FORMAT!r}) nor a classifier ({CLASSIFIER_FORMAT!r})")
        if config_file:
            raise ValueError(f"--config is for official checkpoints and --checkpoint none: {path} carries its own "
                             "config (change parts of it with --set section.key=value)")
        require_parts(obj, path, ("config", "model"), "evaluate it")
        if not isinstance(obj["model"], Mapping):
            raise CheckpointError(f"{path}: its 'model' is {type(obj['model']).__name__}, not a state dict")
        config = build_config(obj["config"], overrides)
        recipe = obj.get("data_recipe")
        if recipe is not None and not isinstance(recipe, Mapping):
            raise CheckpointError(f"{path}: its 'data_recipe' is {type(recipe).__name__}, not a dict")
        recipe = dict(recipe) if recipe is not None else None
        if fmt == PRETRAIN_FORMAT:
            return Pretrained("skelemix", str(path), config, _strip(obj["model"], "encoder_q."), obj.get("epoch"),
                              recipe)
        return Pretrained("classifier", str(path), config, dict(obj["model"]), obj.get("epoch"), recipe)
    raw = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
    if _is_state_dict(raw):
        keys = [k[len("module."):] if k.startswith("module.") else k for k in raw]
        config = _eval_config(config_file, overrides)
        if any(k.startswith("encoder_q.st_gcn_networks.") for k in keys):
            sd = load_official(raw)
            enc = _strip(sd, "encoder_q.") if any(k.startswith("encoder_q.") for k in sd) else sd
            enc = {k: v for k, v in enc.items() if not k.startswith(_OFFICIAL_EXTRAS)}
            return Pretrained("official", str(path), config, enc)
        if any(k.startswith("encoder_q.blocks.") for k in keys):
            sd = {k: v for k, v in zip(keys, raw.values())}
            return Pretrained("state_dict", str(path), config, _strip(sd, "encoder_q."))
    raise CheckpointError(f"{path} is neither a skelemix pretraining checkpoint (a dict with format "
                          f"{PRETRAIN_FORMAT!r}) nor an official SkeleMixCLR state dict (encoder_q.st_gcn_networks.* "
                          f"keys); found {_describe(obj)}")


def projection_head(state: Mapping | None) -> tuple[str | None, int | None]:
    """``(head, out_dim)`` of the ``fc.*`` weights in an encoder state dict; ``(None, None)`` without any."""
    fc = _strip(state or {}, "fc.")
    if not fc:
        return None, None
    if "weight" in fc:
        return "linear", fc["weight"].shape[0]
    if "3.weight" in fc and "1.running_mean" in fc:
        return "mlp", fc["3.weight"].shape[0]
    if "2.weight" in fc:
        return "mlp_nobn", fc["2.weight"].shape[0]
    raise ValueError(f"unrecognised projection head with keys {sorted('fc.' + k for k in fc)}")


def _architecture_hint(state: Mapping) -> str:
    """What the weights say about the architecture, for mismatch errors."""
    try:
        K = state["A"].shape[0] if "A" in state else 3
        hc = state["blocks.0.gcn.conv.weight"].shape[0] // K
        hd = state["blocks.9.tcn.2.weight"].shape[0]
    except (KeyError, AttributeError, IndexError):
        return ""
    return (f"; the checkpoint looks like model.hidden_channels={hc}, model.hidden_dim={hd} (pass e.g. "
            f"--set model.hidden_channels={hc} --set model.hidden_dim={hd})")


def build_encoder(pre: Pretrained, num_class: int | None, head: str = "linear", keep_fc: bool = False,
                  impl: str = "auto", seed: int = 0):
    """The encoder of ``pre.config`` with the official initialisation, then the checkpoint's weights.

    The weights include BN statistics and edge importances (as the official evaluation loads them); the
    checkpoint's ``fc`` (the projection head) is dropped unless ``keep_fc``, so the classifier ``fc`` of
    ``num_class`` outputs stays freshly initialised.
    """
    torch.manual_seed(seed)
    encoder = make_encoder(pre.config.model, num_class=num_class, head=head, impl=impl)
    encoder.apply(init_weights)
    if pre.encoder_state is None:
        return encoder
    state = {k: v for k, v in pre.encoder_state.items() if keep_fc or not k.startswith("fc.")}
    m = pre.config.model
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3]).rstrip(".")
        raise ValueError(f"the weights of {pre.path} do not fit the encoder of the config (hidden_channels="
                         f"{m.hidden_channels}, hidden_dim={m.hidden_dim}, layout {m.layout}, graph {m.graph}, "
                         f"edge_importance {m.edge_importance}): {detail}{_architecture_hint(state)}") from None
    missing = [k for k in missing if not (k.startswith("fc.") and not keep_fc)]
    if missing or unexpected:
        raise ValueError(f"the weights of {pre.path} do not fit the encoder of the config: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}{_architecture_hint(state)}")
    return encoder


# --------------------------------------------------------------------------------------------- data
def with_data(config: Config, data: str | None = None, view: str | None = None) -> Config:
    """``config`` with its data section pointed at ``data`` (a prepared folder or ``synthetic``) and ``view``;
    for a prepared folder the frame count comes from its ``meta.json``."""
    from .data import read_meta

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


def _shard(ds):
    """This process's contiguous share of ``ds`` under torchrun (``ds`` itself in one process)."""
    return ds if distributed.world_size() == 1 else Subset(ds, list(distributed.shard(len(ds))))


def _gathered(features_and_labels):
    """Every process's shard of ``(features, labels)``, concatenated in rank order (the whole split)."""
    return tuple(distributed.gather_rows(t) for t in features_and_labels)


def _loader(ds, batch_size: int, device: torch.device, workers: int, shuffle: bool = False,
            drop_last: bool = False, generator=None) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=workers,
                      pin_memory=device.type == "cuda", generator=generator)


class _Augmented:
    """A loader whose batches get the pretraining augmentation (shear + temporal shift), as the official kNN
    monitor's feeders apply it to both the memory bank and the test data (REFERENCE.md 6.2)."""

    def __init__(self, loader, shear: float, ratio: int, seed: int, coords: int = 3):
        self.loader, self.shear, self.ratio, self.coords = loader, shear, ratio, coords
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        for x, y in self.loader:
            yield pretrain_augment(x, self.shear, self.ratio, generator=self.generator, coords=self.coords), y


# ------------------------------------------------------------------------------------------ protocols
def _lr_at(epoch: int, base: float, milestones, warmup: int) -> float:
    """The official schedule: linear warm-up ``base * epoch / warmup`` for epochs before ``warmup`` (1-based),
    then ``base * 0.1 ** #(milestones passed)``."""
    if epoch < warmup:
        return base * epoch / warmup
    return base * 0.1 ** sum(epoch > m for m in milestones)


@torch.no_grad()
def predict(encoder, loader, device, view: str, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features, logits, labels)`` of every batch (CPU), in eval mode: the pooled backbone feature and the
    classifier's output in one pass."""
    was_training = encoder.training
    encoder.eval()
    feats, logits, labels = [], [], []
    for x, y in loader:
        x = to_view(x.to(device, non_blocking=True), view, layout)
        h = encoder.pool(encoder.feature_map(x), x.shape[-1])
        feats.append(h.float().cpu())
        logits.append(encoder.fc(h).float().cpu())
        labels.append(torch.as_tensor(y))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(logits), torch.cat(labels)


def finetune(encoder, train_set, val_set, *, device, view: str, layout: str, epochs: int, lr: float, milestones,
             weight_decay: float, nesterov: bool, warmup: int, batch_size: int = 128, eval_interval: int = 5,
             official_eval_mode: bool = False, clip_grad_norm: float | None = None, workers: int = 0, seed: int = 0,
             log=print) -> dict:
    """Train every parameter of ``encoder`` (with its classifier ``fc``) with cross-entropy (REFERENCE.md 6.3).

    SGD with momentum 0.9, batches of ``batch_size`` (last partial batch dropped, as the official loader does),
    no augmentation. By default the network trains in train mode (BN batch statistics, dropout on);
    ``official_eval_mode`` reproduces the official ``model.eval()`` during training (BN frozen at the
    pretrained statistics, no dropout; quirk 16). ``clip_grad_norm`` clips after ``backward()``; the official
    call came before ``backward()`` and never clipped anything (quirk 17), so the default is off.

    Returns ``{"history": [{"epoch", "top1", "top5", "loss"}], "features", "logits", "labels"}`` with the
    features and logits of the val split under the final weights.
    """
    g = torch.Generator().manual_seed(seed)
    bs = min(batch_size, len(train_set))
    train_loader = _loader(train_set, bs, device, workers, shuffle=True, drop_last=True, generator=g)
    val_loader = _loader(val_set, batch_size, device, workers)
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay)
    history = []
    for epoch in range(1, epochs + 1):
        for group in opt.param_groups:
            group["lr"] = _lr_at(epoch, lr, milestones, warmup)
        encoder.train(not official_eval_mode)
        losses = []
        for x, y in train_loader:
            x = to_view(x.to(device, non_blocking=True), view, layout)
            loss = F.cross_entropy(encoder(x), torch.as_tensor(y).to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the fine-tuning loss became {loss.item()} in epoch {epoch}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
            opt.step()
            losses.append(loss.item())
        if epoch % eval_interval == 0 or epoch == epochs:
            feats, logits, labels = predict(encoder, val_loader, device, view, layout)
            top = topk_accuracy(logits, labels)
            history.append({"epoch": epoch, "top1": top[1], "top5": top[5],
                            "loss": float(np.mean(losses)) if losses else float("nan")})
            log(f"  epoch {epoch:>3}/{epochs}  lr {opt.param_groups[0]['lr']:.4g}  loss {history[-1]['loss']:.4f}  "
                f"top-1 {top[1]:.2f}%  top-5 {top[5]:.2f}%")
    return {"history": history, "features": feats, "logits": logits, "labels": labels}


def protocols(history: list[dict]) -> dict:
    """The paper's number (best test top-1 over the periodic evaluations) and the clean one (last epoch)."""
    best = max(history, key=lambda h: h["top1"])  # the first of equals, as a running max keeps it
    last = history[-1]
    return {"paper": {"description": PAPER, "top1": best["top1"], "top5": best["top5"], "epoch": best["epoch"]},
            "clean": {"description": CLEAN, "top1": last["top1"], "top5": last["top5"], "epoch": last["epoch"]}}


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` counts, rows the true class, columns the predicted one."""
    return np.bincount(np.asarray(labels) * num_classes + np.asarray(preds),
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


# -------------------------------------------------------------------------------------------- ensemble
def ensemble(dirs: list[str | os.PathLike], out: str | os.PathLike | None = None, plots: bool = True) -> dict:
    """Average the softmax scores saved by several evaluations (e.g. the joint, motion and bone streams) and
    report top-1/top-5 of every stream and of the ensemble. The label arrays must be identical."""
    if not dirs:
        raise ValueError("ensemble needs at least one result folder")
    streams = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise FileNotFoundError(f"result folder not found: {d}")
        for name in ("scores.npy", "labels.npy"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d} is not an evaluation output folder: {name} is missing (run "
                                        "`python -m skelemix.evaluate linear|knn|finetune|semi --out DIR` first)")
        info = json.loads((d / "results.json").read_text()) if (d / "results.json").is_file() else {}
        streams.append({"dir": d, "scores": np.load(d / "scores.npy"), "labels": np.load(d / "labels.npy"),
                        "info": info})
    ref = streams[0]
    for s in streams[1:]:
        if s["labels"].shape != ref["labels"].shape:
            raise ValueError(f"the label arrays differ: {ref['dir']} has {len(ref['labels'])} val samples and "
                             f"{s['dir']} {len(s['labels'])}; the streams must be evaluated on the same val split")
        if not np.array_equal(s["labels"], ref["labels"]):
            n = int((s["labels"] != ref["labels"]).sum())
            raise ValueError(f"the label arrays differ: {s['dir']} disagrees with {ref['dir']} on {n} of "
                             f"{len(ref['labels'])} samples; the streams must be evaluated on the same val split "
                             "in the same order")
    for s in streams:
        if s["scores"].ndim != 2 or len(s["scores"]) != len(ref["labels"]):
            raise ValueError(f"{s['dir']}/scores.npy has shape {s['scores'].shape}; expected ({len(ref['labels'])}, "
                             "num_classes)")
        if s["scores"].shape[1] != ref["scores"].shape[1]:
            raise ValueError(f"mismatched num_classes: {ref['dir']} has scores for {ref['scores'].shape[1]} classes "
                             f"and {s['dir']} for {s['scores'].shape[1]}")
    labels = torch.from_numpy(ref["labels"])
    rows = []
    for s in streams:
        top = topk_accuracy(torch.from_numpy(s["scores"]), labels)
        rows.append({"dir": str(s["dir"]), "mode": s["info"].get("mode"), "view": s["info"].get("view"),
                     "top1": top[1], "top5": top[5]})
    mean = np.mean([s["scores"].astype(np.float64) for s in streams], axis=0).astype(np.float32)
    top = topk_accuracy(torch.from_numpy(mean), labels)
    result = {"mode": "ensemble", "streams": rows, "ensemble": {"top1": top[1], "top5": top[5]},
              "num_classes": int(mean.shape[1]), "val_samples": len(labels),
              "classes": ref["info"].get("classes")}
    if out is None:
        parents = [str(Path(s["dir"]).resolve().parent) for s in streams]
        out = Path(os.path.commonpath(parents)) / "eval_ensemble"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "scores.npy", mean)
    np.save(out / "labels.npy", ref["labels"])
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    width = max(len("ensemble"), *(len(r["dir"]) for r in rows))
    print(f"ensemble of {len(rows)} streams (mean of softmax scores) on {len(labels)} val samples")
    print(f"  {'stream':<{width}}  {'view':<6}  {'top-1':>6}  {'top-5':>6}")
    for r in rows:
        print(f"  {r['dir']:<{width}}  {str(r['view'] or '-'):<6}  {r['top1']:6.2f}  {r['top5']:6.2f}")
    print(f"  {'ensemble':<{width}}  {'':<6}  {top[1]:6.2f}  {top[5]:6.2f}")
    if plots:
        from .viz import plot_confusion

        classes = result["classes"] or [str(c) for c in range(mean.shape[1])]
        plot_confusion(confusion_matrix(ref["labels"], mean.argmax(1), mean.shape[1]), classes,
                       out / "confusion.png", title=f"ensemble of {len(rows)} streams (top-1 {top[1]:.1f}%)")
    print(f"wrote {out}/results.json")
    result["out"] = str(out)
    return result


# ------------------------------------------------------------------------------------------------ run
def _seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _settings(args, mode_key: str) -> dict:
    """The protocol's defaults with the command line's overrides."""
    s = dict(PROTOCOLS[mode_key])
    for key in ("lr", "epochs", "milestones", "weight_decay", "nesterov"):
        value = getattr(args, key, None)
        if value is not None:
            s[key] = value
    if getattr(args, "warmup_epochs", None) is not None:
        s["warmup"] = args.warmup_epochs
    if s["epochs"] < 1 or s["lr"] <= 0 or args.eval_interval < 1:
        raise ValueError(f"--epochs and --eval-interval must be >= 1 and --lr > 0; got {s['epochs']}, "
                         f"{args.eval_interval}, {s['lr']}")
    s["eval_interval"] = args.eval_interval
    s["batch_size"] = args.batch_size
    return s


def _semi_key(fraction: float) -> str:
    """The released semi config closest to ``fraction`` (0.01 or 0.1)."""
    return "semi-0.01" if abs(np.log(fraction / 0.01)) < abs(np.log(fraction / 0.1)) else "semi-0.1"


def run(args) -> dict:
    """Evaluate as ``args`` (parsed by :func:`parse_args`) says; raises on errors. Returns the results dict."""
    if args.mode == "ensemble":
        return ensemble(args.dirs, args.out, plots=not args.no_plots)
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
    impl = ops.check_impl(args.impl or config.train.impl)
    view, layout = config.data.view, config.model.layout
    _seed_everything(seed)

    from .data import load_splits

    train_set, val_set = load_splits(config.data)
    classes = class_names(train_set, val_set)
    C = len(classes)
    if args.out:
        out = Path(args.out)
    elif pre.path:
        out = Path(pre.path).parent.parent / f"eval_{args.mode}"
    else:
        out = Path("runs") / f"eval_{args.mode}_random_init"
    out.mkdir(parents=True, exist_ok=True)
    what = {"skelemix": "skelemix checkpoint", "classifier": "skelemix classifier", "official": "official checkpoint",
            "state_dict": "state dict", "none": "random initialisation"}[pre.kind]
    if pre.epoch is not None:
        what += f", epoch {pre.epoch}"
    distributed.print0(f"{args.mode} evaluation of {pre.path or 'none'} ({what}) on {config.data.root} "
                       f"({len(train_set)} train / {len(val_set)} val, {C} classes), view {view}, device {device}",
                       flush=True)
    result = {"mode": args.mode, "checkpoint": pre.path or "none", "checkpoint_kind": pre.kind,
              "checkpoint_epoch": pre.epoch, "data": config.data.root, "view": view, "classes": classes,
              "num_classes": C, "train_samples": len(train_set), "val_samples": len(val_set), "seed": seed,
              "device": str(device)}
    extra_files = []

    if args.mode == "knn":
        projection = args.features == "projection"
        if projection:
            head, dim = projection_head(pre.encoder_state)
            if head is None and pre.encoder_state is not None:
                raise ValueError(f"{pre.path} has no projection head (fc); use --features backbone")
            if head is None:  # random init: the head the config's variant would train
                m = pre.config.model
                head, dim = m.head or VARIANTS[m.variant]["head"], m.feature_dim
            encoder = build_encoder(pre, dim, head=head, keep_fc=True, impl=impl, seed=seed).to(device)
        else:
            encoder = build_encoder(pre, None, impl=impl, seed=seed).to(device)
        loaders = [_loader(_shard(ds), args.batch_size, device, workers) for ds in (train_set, val_set)]
        if args.augment:
            d = config.data
            loaders = [_Augmented(ld, d.shear, d.temporal_ratio, seed + i, coordinates(config.model.channels))
                       for i, ld in enumerate(loaders)]
        (bank, bank_labels), (feats, labels) = [_gathered(extract_features(encoder, ld, device, view, layout,
                                                                           projection=projection)) for ld in loaders]
        if not distributed.is_main():
            return {}
        per_k, votes = {}, {}
        for k in args.k:
            votes[k] = knn_scores(bank, bank_labels, feats, k, C, t=args.t)
            top = topk_accuracy(votes[k], labels)
            per_k[str(k)] = {"top1": top[1], "top5": top[5]}
        k_scores = max(args.k)
        scores = (votes[k_scores] / votes[k_scores].sum(1, keepdim=True)).numpy()
        result["knn"] = per_k
        result["settings"] = {"k": list(args.k), "t": args.t, "features": args.features, "augment": args.augment,
                              "scores_k": k_scores, "feature_dim": int(feats.shape[1])}
        print(f"  weighted kNN (t={args.t}) on the {args.features} features"
              f"{' of augmented data (as the official monitor)' if args.augment else ''}:")
        print(f"  {'k':>4}  {'top-1':>6}  {'top-5':>6}")
        for k in args.k:
            print(f"  {k:>4}  {per_k[str(k)]['top1']:6.2f}  {per_k[str(k)]['top5']:6.2f}")
        encoder_to_save = None
    else:
        if args.mode == "linear":
            settings = _settings(args, "linear")
            encoder = build_encoder(pre, C, impl=impl, seed=seed).to(device)
            # The official linear evaluation freezes the encoder, keeps it in eval mode during training (BN uses
            # the pretrained running statistics, dropout is off) and feeds it unaugmented data. Its features
            # therefore never change between epochs, and training the classifier on features computed once is
            # exactly the official computation, minus 149 redundant passes through the encoder.
            loaders = [_loader(_shard(ds), args.batch_size, device, workers) for ds in (train_set, val_set)]
            (tr_f, tr_y), (va_f, va_y) = [_gathered(extract_features(encoder, ld, device, view, layout))
                                          for ld in loaders]
            if not distributed.is_main():
                return {}
            fit = train_linear(tr_f, tr_y, va_f, va_y, C, epochs=settings["epochs"], lr=settings["lr"],
                               milestones=settings["milestones"], batch_size=args.batch_size,
                               eval_interval=settings["eval_interval"], seed=seed, device=device)
            encoder.fc.load_state_dict(fit["fc"].state_dict())
            history, logits, labels, feats = fit["history"], fit["logits"], va_y, va_f
            for h in history:
                print(f"  epoch {h['epoch']:>3}/{settings['epochs']}  top-1 {h['top1']:.2f}%  top-5 {h['top5']:.2f}%")
            settings.update(momentum=0.9, frozen=True, eval_mode=True, cached_features=True)
            del settings["weight_decay"], settings["nesterov"], settings["warmup"]
        else:
            train_part = train_set
            if args.mode == "semi":
                if not 0 < args.fraction <= 1:
                    raise ValueError(f"--fraction must be in (0, 1]; got {args.fraction}")
                settings = _settings(args, _semi_key(args.fraction))
                subset = balanced_subset(np.asarray(train_set.targets), args.fraction, seed)
                train_part = Subset(train_set, subset.tolist())
                np.save(out / "subset_indices.npy", subset)
                extra_files.append("subset_indices.npy")
                counts = np.bincount(np.asarray(train_set.targets)[subset], minlength=C)
                result["subset"] = {"fraction": args.fraction, "seed": seed, "size": int(len(subset)),
                                    "per_class": counts.tolist(), "indices_file": "subset_indices.npy"}
                print(f"  labelled subset: {len(subset)} of {len(train_set)} training samples ({args.fraction:g} "
                      f"per class, seed {seed}); indices in {out / 'subset_indices.npy'}")
            else:
                settings = _settings(args, "finetune")
            encoder = build_encoder(pre, C, impl=impl, seed=seed).to(device)
            fit = finetune(encoder, train_part, val_set, device=device, view=view, layout=layout,
                           epochs=settings["epochs"], lr=settings["lr"], milestones=settings["milestones"],
                           weight_decay=settings["weight_decay"], nesterov=settings["nesterov"],
                           warmup=settings["warmup"], batch_size=args.batch_size,
                           eval_interval=settings["eval_interval"], official_eval_mode=args.official_eval_mode,
                           clip_grad_norm=args.clip_grad_norm, workers=workers, seed=seed,
                           log=lambda m: print(m, flush=True))
            history, logits, labels, feats = fit["history"], fit["logits"], fit["labels"], fit["features"]
            settings.update(momentum=0.9, official_eval_mode=args.official_eval_mode,
                            clip_grad_norm=args.clip_grad_norm)
        result["protocols"] = protocols(history)
        result["history"] = history
        result["settings"] = settings
        scores = torch.softmax(logits.float(), 1).numpy()
        encoder_to_save = encoder
        p = result["protocols"]
        print(f"  {'protocol':<64}  {'top-1':>6}  {'top-5':>6}")
        print(f"  {'paper: best test top-1 over the evaluations (epoch ' + str(p['paper']['epoch']) + ')':<64}  "
              f"{p['paper']['top1']:6.2f}  {p['paper']['top5']:6.2f}")
        print(f"  {'clean: top-1 after the last epoch (' + str(p['clean']['epoch']) + ')':<64}  "
              f"{p['clean']['top1']:6.2f}  {p['clean']['top5']:6.2f}")

    labels_np = labels.numpy().astype(np.int64)
    np.save(out / "scores.npy", scores.astype(np.float32))
    np.save(out / "labels.npy", labels_np)
    if encoder_to_save is not None:
        save_checkpoint({"format": CLASSIFIER_FORMAT, "mode": args.mode, "config": config.to_dict(),
                         "classes": classes, "model": encoder_to_save.state_dict(),
                         "data_recipe": pre.data_recipe or recipe(train_set.meta)}, out / "classifier.pt")
        extra_files.append("classifier.pt")
    result["elapsed_s"] = round(time.perf_counter() - start, 2)
    result["files"] = ["results.json", "scores.npy", "labels.npy", *extra_files]
    if not args.no_plots:
        from .viz import plot_confusion, plot_embedding

        preds = scores.argmax(1)
        label = {"linear": "linear classifier", "knn": f"kNN, k={max(args.k) if args.mode == 'knn' else ''}",
                 "finetune": "fine-tuned", "semi": f"semi-supervised, {getattr(args, 'fraction', '')} labels"}
        plot_confusion(confusion_matrix(labels_np, preds, C), classes, out / "confusion.png",
                       title=f"{label[args.mode]} ({view}): top-1 {100 * (preds == labels_np).mean():.1f}%")
        plot_embedding(feats.numpy(), labels_np, classes, out / "embedding.png",
                       title=f"val features ({view}, {what}), 2-D PCA")
        result["files"] += ["confusion.png", "embedding.png"]
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {', '.join(result['files'])} in {out} ({result['elapsed_s']:.0f}s)", flush=True)
    result["out"] = str(out)
    return result


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
