"""Checkpoints: atomic writes, safe loading, and interop with the official SkeleMixCLR state dicts.

Files from users are untrusted: everything is loaded with ``torch.load(weights_only=True)``, and a file that
cannot be used raises :class:`CheckpointError` naming it.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from .cli import clip, short

PRETRAIN_FORMAT = "skelemix-pretrain/1"  # the trainer's checkpoints: config, model, optimizer, position, RNG
CLASSIFIER_FORMAT = "skelemix-classifier/1"  # evaluate's trained classifiers: config and encoder

# (official key pattern, ours); applied after an optional encoder prefix. Everything else keeps its name.
_OFFICIAL_TO_OURS = [
    (re.compile(r"^st_gcn_networks\.(\d+)\."), r"blocks.\1."),
    (re.compile(r"^edge_importance\.(\d+)$"), r"blocks.\1.edge_importance"),
]
_OURS_TO_OFFICIAL = [
    (re.compile(r"^blocks\.(\d+)\.edge_importance$"), r"edge_importance.\1"),
    (re.compile(r"^blocks\.(\d+)\."), r"st_gcn_networks.\1."),
]
_ENCODERS = ("encoder_q.", "encoder_k.")
# Official buffers with no counterpart here (label monitoring of the v1/swap models: quirk 13).
_DROPPED = ("queue_label",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, of another kind, or without a part the caller needs."""


def remove_temporaries(folder: str | os.PathLike, name: str | None = None) -> None:
    """Delete the temporary files that :func:`save_checkpoint` leaves in ``folder`` when it is killed mid-write:
    those of the checkpoint ``name``, or of every ``*.pt``. Only for folders that one process writes to."""
    for stale in Path(folder).glob(f".{glob.escape(name)}.*.tmp" if name else ".*.pt.*.tmp"):
        stale.unlink(missing_ok=True)


def save_checkpoint(obj, path: str | os.PathLike) -> Path:
    """Write ``torch.save(obj)`` to ``path`` atomically: a temporary file in the same folder, fsync, rename.

    A crash at any point leaves either the previous file or the new one, never a truncated one; the temporary
    files of writes that were killed are removed by the next save. An ``OSError`` (a full disk) names ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(path)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu"):
    """Load a checkpoint without executing anything it contains (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:  # an OSError here (permissions) names the file itself
        try:
            return torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:  # a global or an opcode outside the weights-only allow-list
            raise CheckpointError(f"cannot load checkpoint {path} safely (weights_only=True): "
                                  f"{_torch_reason(err)}") from err
        except Exception as err:  # torch reports a truncated archive as EOFError or OSError(EINVAL)
            raise CheckpointError(f"cannot load checkpoint {path}: the file is damaged, truncated or not a torch "
                                  f"checkpoint ({_torch_reason(err)})") from err


def _torch_reason(err: Exception) -> str:
    """What torch.load's error says about the file, without its advice to load with weights_only=False."""
    advice = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.strip().startswith(advice)]
    return " ".join(lines) or type(err).__name__


def require_parts(ckpt, path: str | os.PathLike, parts, purpose: str) -> None:
    """Raise a :class:`CheckpointError` naming ``path`` and every missing key when ``ckpt`` is not a dict with
    all of ``parts``."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: cannot {purpose}: expected a dict, found {type(ckpt).__name__}")
    missing = [repr(k) for k in parts if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: cannot {purpose}: the checkpoint has no {', '.join(missing)} (found keys "
                              f"{short(sorted(map(str, ckpt)))})")


@contextlib.contextmanager
def reading_part(path: str | os.PathLike, part: str):
    """Turn the errors of applying a checkpoint's ``part`` (wrong shapes, types or keys in an untrusted file)
    into a :class:`CheckpointError` naming the file and the part."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = f"no key {short(err.args[0])}" if isinstance(err, KeyError) and err.args else \
            clip(" ".join(lines[:2]), 300) or type(err).__name__
        raise CheckpointError(f"{path}: its {part!r} does not fit this run: {detail}") from err


def _rename(key: str, rules) -> str:
    prefix = next((p for p in _ENCODERS if key.startswith(p)), "")
    rest = key[len(prefix):]
    for pattern, repl in rules:
        rest, n = pattern.subn(repl, rest)
        if n:
            break
    return prefix + rest


def _as_state_dict(src) -> Mapping[str, torch.Tensor]:
    if isinstance(src, (str, os.PathLike)):
        src = load_checkpoint(src)
    if isinstance(src, Mapping) and "state_dict" in src and isinstance(src["state_dict"], Mapping):
        src = src["state_dict"]
    if not isinstance(src, Mapping) or not all(isinstance(v, torch.Tensor) for v in src.values()):
        raise ValueError("expected a state dict (a mapping of names to tensors) or a path to one")
    return src


def load_official(src) -> dict[str, torch.Tensor]:
    """Convert an official SkeleMixCLR state dict (path or mapping) to this package's names.

    * Pretraining checkpoints (``encoder_q.*``, ``encoder_k.*``, ``queue``, ``queue_ptr``) load into
      :class:`skelemix.models.SkeleMixCLR` (``load_state_dict(load_official(path))``).
    * Linear-eval / fine-tune checkpoints (``encoder_q.*`` only, ``fc`` a Linear) load into an
      :class:`skelemix.models.STGCN` classifier: the ``encoder_q.`` prefix is removed.

    A ``module.`` prefix (DataParallel) is stripped; ``queue_label`` is dropped.
    """
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in _as_state_dict(src).items()}
    sd = {k: v for k, v in sd.items() if k not in _DROPPED}
    classifier = not any(k.startswith("encoder_k.") or k == "queue" for k in sd)
    out = {}
    for key, value in sd.items():
        new = _rename(key, _OFFICIAL_TO_OURS)
        if classifier:
            if not new.startswith("encoder_q."):
                raise ValueError(f"unexpected key {key!r} in an official classifier checkpoint")
            new = new[len("encoder_q."):]
        out[new] = value
    return out


def export_official(src) -> dict[str, torch.Tensor]:
    """The inverse of :func:`load_official`: a SkeleMixCLR or STGCN (module or state dict) -> official names.

    A SkeleMixCLR gives a pretraining checkpoint; an STGCN gives the ``encoder_q.``-prefixed state dict of
    the official evaluation wrapper.
    """
    sd = src.state_dict() if isinstance(src, torch.nn.Module) else _as_state_dict(src)
    pretrain = any(k.startswith("encoder_q.") for k in sd)
    return {("" if pretrain else "encoder_q.") + _rename(k, _OURS_TO_OFFICIAL): v for k, v in sd.items()}
