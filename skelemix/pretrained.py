"""An encoder from any checkpoint evaluation takes: the trainer's, an evaluated classifier, an official
SkeleMixCLR state dict, a raw state dict with this package's names, or none (random initialisation).

:func:`load_pretrained` tells the kind from the file's contents; :func:`build_encoder` builds the encoder the
config describes and loads the weights, naming what does not fit. Used by ``python -m skelemix.evaluate``,
:mod:`skelemix.embed` and :mod:`skelemix.export`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from . import cli
from .checkpoint import (CLASSIFIER_FORMAT, PRETRAIN_FORMAT, CheckpointError, load_checkpoint, load_official,
                         require_parts)
from .config import Config, build_config, load_yaml, make_encoder
from .models import init_weights

# Official encoder_q sub-modules that the official evaluation ignores besides fc (docs/DESIGN.md 6.1).
_OFFICIAL_EXTRAS = ("Ap", "global_head.", "local_head.", "global_mlps.", "tem_local_mlps.", "spa_local_mlps.")


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
