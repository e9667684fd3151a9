"""Pretraining configuration: typed defaults, YAML files with ``base:`` inheritance, ``--set key=value``.

Every value is checked when the config is built: unknown keys (with the closest valid one), values that do not
fit the field's annotation (its type, or its ``Literal`` choices), values out of range and impossible
combinations raise :class:`ConfigError` naming the key, the expected and the actual value. Reading the files
themselves (YAML 1.2 numbers, bounded aliases, ``base:`` chains) is :mod:`skelemix.config_files`.

Adding a setting is one field here: a model field marked ``_to(part)`` reaches the encoder, the objective or
the mixer by its name (see :func:`make_pretrain_model`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .augment import VIEWS
from .cli import describe, short
from .config_files import (CONFIG_DIR, MAX_YAML_NODES, ConfigError, check_type, hints,  # noqa: F401 (re-exported)
                           list_configs, load_yaml, parse_override)
from .data.prepared import CHANNELS, channels_of
from .distributed import BACKENDS, BN_MODES
from .graph import STRATEGIES, LayoutError, get_layout, layout_value
from .mix import MODES, PARTNERS, SPATIAL_MODES
from .models.skelemixclr import VARIANTS, SwapRow, build_pretrain_model
from .models.stgcn import STGCN, TEMPORAL_STRIDE
from .ops import IMPLS

MAX_SEED = 2**32 - 1  # numpy's limit
# Keys that moved (old -> new): files, --set and the configs inside older checkpoints may still use the old ones.
RENAMED = {"train.impl": "model.impl", "train.epilogue": "model.epilogue"}

# ``Literal[CHOICES]`` with a tuple is ``Literal[*CHOICES]``: the choices stay defined where they are used.


def _to(part: str, default, arg: str | None = None):
    """A model field that :func:`make_pretrain_model` passes to ``part`` ("encoder", "objective" or "mix") as
    the keyword ``arg`` (default: the field's name); ``None`` values are left out (the part's default)."""
    return field(default=default, metadata={"part": part, "arg": arg})


@dataclass
class DataConfig:
    root: str = "synthetic"  # a prepared dataset folder, or "synthetic" for generated data held in memory
    train_split: str = "train"
    val_split: str = "val"
    view: Literal[VIEWS] = "joint"
    frames: int = 64  # must match the prepared data
    shear: float = 0.5  # shear amplitude of the pretraining augmentation (<= 0: off)
    temporal_ratio: int = 6  # mirrored temporal shift of up to frames // ratio (<= 0: off)
    synthetic_train: int = 880  # sizes of the generated splits when root == "synthetic"
    synthetic_val: int = 440
    synthetic_seed: int = 0


@dataclass
class ModelConfig:
    variant: Literal[tuple(VARIANTS)] = "skelemixclr+"
    # The skeleton: "auto" (the data's), a shipped layout (ntu-rgb+d, nw-ucla, coco-17) or a layout file, which
    # the built config holds as its mapping (so saved configs and checkpoints do not depend on the file).
    layout: str | dict = "auto"
    channels: Literal[("auto", *CHANNELS)] = "auto"  # the input channels; auto: the data's
    graph: Literal[STRATEGIES] = "agcn"
    hidden_channels: int = _to("encoder", 16)
    hidden_dim: int = _to("encoder", 256)
    dropout: float = _to("encoder", 0.5)
    edge_importance: bool = _to("encoder", True)
    impl: Literal[IMPLS] = _to("encoder", "auto")  # the implementation of the fused ops (skelemix.ops)
    # "fused" (default): each ST-GCN block runs its BatchNorms, dropout, residual add and ReLUs as two
    # bn_epilogue calls (Philox4x32-10 dropout masks; on the CPU the step 1.74x eager instead of 1.28x); its
    # 20-seed sweep learns as the modules do (docs/RESULTS.md). "modules": the plain modules and torch's dropout.
    epilogue: Literal["modules", "fused"] = "fused"
    feature_dim: int = _to("objective", 128)
    queue_size: int = _to("objective", 32768)
    momentum: float = _to("objective", 0.999)
    temperature: float = _to("objective", 0.2)
    # Rows [spa_l, spa_u, tem_l, tem_u, repeat, weight] (models.SwapRow); None: the variant's.
    swap_params: list | None = _to("objective", None)
    head: Literal[None, "mlp", "mlp_nobn", "linear"] = _to("objective", None)  # None: the variant's
    alpha: float = _to("objective", 1.0)
    repeat_reduction: Literal["mean", "sum"] = _to("objective", "mean")  # "sum": the official SkeleMixCLR+ weighting
    official_key_init: bool = _to("objective", False)
    mix_mode: Literal[MODES] = _to("mix", "swap", arg="mode")
    spatial_mode: Literal[SPATIAL_MODES] = _to("mix", "semantic")
    per_sample: bool = _to("mix", False)
    partner: Literal[PARTNERS] = _to("mix", "shift")


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"  # sgd: the paper's
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    steps: list = field(default_factory=lambda: [300])  # lr *= 0.1 after each of these (1-based) epochs
    # The base lr rule: "none" uses lr as given; "linear" uses lr * train.batch_size / lr_reference_batch (the
    # linear scaling rule, for a global batch changed from the one lr was tuned for).
    lr_scaling: Literal["none", "linear"] = "none"
    lr_reference_batch: int = 128


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 128  # the global batch: split evenly over the processes of a torchrun launch
    workers: int = 4
    seed: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # The fast path. data_placement "device": keep the training set on the device and index batches there
    # (no DataLoader workers, no per-sample CPU work); "host": a DataLoader; "auto": device for a CUDA device
    # when the data takes under half its free memory. amp: bf16 autocast of the encoders (none by default
    # until GPU runs have validated it). cuda_graph: capture the whole training step (augmentation, mixing,
    # both encoders, losses, backward, optimizer step, momentum update, enqueue) as one CUDA graph and replay
    # it every step; the random draws stay on the host (the same generator, the same order). "on" needs one
    # CUDA process; "auto" means off until a GPU run has validated it (as amp).
    data_placement: Literal["auto", "device", "host"] = "auto"
    amp: Literal["none", "bf16"] = "none"
    cuda_graph: Literal["auto", "on", "off"] = "auto"
    out: str = "runs/pretrain"
    save_interval: int = 5  # epochs between kept checkpoints (the latest is always kept)
    knn_interval: int = 5  # epochs between kNN monitor runs (and at the last epoch); 0: off
    knn_k: list = field(default_factory=lambda: [10, 20, 40])
    knn_t: float = 0.1
    final_linear_eval: bool = False  # after pretraining: linear accuracy, pretrained vs random init
    linear_epochs: int = 100


@dataclass
class DistConfig:
    """Settings that matter only when torchrun starts several processes (see skelemix/distributed.py)."""
    backend: Literal[BACKENDS] = "auto"  # auto: nccl for GPUs, gloo for CPUs
    # BatchNorm statistics: per_rank (over each process's share of the batch, the paper's single-GPU
    # statistics when that share is the paper's batch) | sync (over the global batch) | shuffle (per rank,
    # with MoCo's cross-rank shuffle of the key encoder's batch)
    bn: Literal[BN_MODES] = "per_rank"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------- building a config
def _entries(raw: dict | None, overrides: list[str] | dict | None) -> list[tuple[str, str, Any]]:
    """``(section, key, value)`` of a nested mapping, then of the overrides (later entries win)."""
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"the config: expected a mapping of sections, got {type(raw).__name__} {short(raw)}")
    entries = []
    for section, values in (raw or {}).items():
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {type(values).__name__}")
        entries += [(section, key, value) for key, value in values.items()]
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for dotted, value in items:
        if dotted.count(".") != 1:
            raise ConfigError(f"override keys look like section.key (e.g. train.epochs); got {short(dotted)}")
        entries.append((*dotted.split("."), value))
    return entries


def _place(section, key, notes: list[str] | None) -> tuple[str, str]:
    """Where an entry goes: its section and key, a renamed key's new place, or an error with the closest match."""
    sections = {f.name: hints(Config)[f.name] for f in dataclasses.fields(Config)}
    if section not in sections:
        hint = difflib.get_close_matches(str(section), sections, n=1)
        raise ConfigError(f"unknown config section {short(section)}" + (f"; did you mean {hint[0]!r}?" if hint
                                                                          else f"; valid: {', '.join(sections)}"))
    old = f"{section}.{key}"
    if old in RENAMED:
        note = f"{old} is now {RENAMED[old]} (the old key still works)"
        if notes is not None and note not in notes:
            notes.append(note)
        return tuple(RENAMED[old].split("."))
    keys = hints(sections[section])
    if key not in keys:
        hint = difflib.get_close_matches(str(key), keys, n=1)
        name = key if isinstance(key, str) else short(key)
        raise ConfigError(f"unknown config key {section}.{name}" + (f"; did you mean {section}.{hint[0]}?"
                                                                    if hint else f"; valid: {', '.join(keys)}"))
    return section, key


def build_config(raw: dict | None = None, overrides: list[str] | dict | None = None,
                 notes: list[str] | None = None) -> Config:
    """A validated :class:`Config` from a nested mapping plus ``section.key`` overrides. Keys that moved
    (:data:`RENAMED`) are read at their new place, and ``notes`` (when given) gets one line for each."""
    given: dict[tuple[str, str], tuple[str, Any]] = {}  # (section, key) -> (the key as written, value)
    for section, key, value in _entries(raw, overrides):
        given[_place(section, key, notes)] = (f"{section}.{key}", value)
    sections: dict[str, dict[str, Any]] = {}
    for (section, key), (name, value) in given.items():  # errors name the key as the user wrote it
        sections.setdefault(section, {})[key] = check_type(name, value, hints(hints(Config)[section])[key])
    config = Config(**{section: hints(Config)[section](**kwargs) for section, kwargs in sections.items()})
    validate(config)
    if config.model.layout != "auto":  # a file is held as its mapping
        config.model.layout = layout_value(config.model.layout)
    return config


# ------------------------------------------------------------------------------------- combinations
def _need(cond, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ranges(c: Config) -> None:
    t, m, d, o = c.train, c.model, c.data, c.optim
    for key, value in (("train.epochs", t.epochs), ("train.batch_size", t.batch_size), ("data.frames", d.frames),
                       ("model.hidden_channels", m.hidden_channels), ("model.hidden_dim", m.hidden_dim),
                       ("model.feature_dim", m.feature_dim), ("model.queue_size", m.queue_size),
                       ("optim.lr_reference_batch", o.lr_reference_batch)):
        _need(value >= 1, f"{key}: must be >= 1; got {value}")
    for key, value in (("train.workers", t.workers), ("train.save_interval", t.save_interval),
                       ("train.knn_interval", t.knn_interval), ("optim.weight_decay", o.weight_decay),
                       ("optim.momentum", o.momentum), ("model.alpha", m.alpha),
                       ("data.synthetic_seed", d.synthetic_seed)):
        _need(value >= 0, f"{key}: must be >= 0; got {value}")
    if d.root == "synthetic":
        for key, value in (("data.synthetic_train", d.synthetic_train), ("data.synthetic_val", d.synthetic_val)):
            _need(value >= 1, f"{key}: must be >= 1; got {value}")
    if t.final_linear_eval:
        _need(t.linear_epochs >= 1, f"train.linear_epochs: must be >= 1; got {t.linear_epochs}")
    _need(0 <= t.seed <= MAX_SEED, f"train.seed: must be in [0, {MAX_SEED}]; got {t.seed}")
    _need(0 <= m.dropout < 1, f"model.dropout: must be in [0, 1); got {m.dropout}")
    _need(0 <= m.momentum <= 1, f"model.momentum: must be in [0, 1]; got {m.momentum}")
    _need(m.temperature > 0, f"model.temperature: must be > 0; got {m.temperature}")
    _need(t.knn_t > 0, f"train.knn_t: must be > 0; got {t.knn_t}")
    _need(o.lr > 0, f"optim.lr: must be > 0; got {o.lr}")
    _need(all(_is_int(s) and s >= 0 for s in o.steps), f"optim.steps: expected a list of epochs; got {short(o.steps)}")
    _need(all(_is_int(k) and k >= 1 for k in t.knn_k), f"train.knn_k: expected positive ints; got {short(t.knn_k)}")


def _check_mixing(c: Config) -> None:
    """The SkeleMix rows against the variant, the batch and the frames (regions are whole feature cells)."""
    m, d, stride = c.model, c.data, TEMPORAL_STRIDE
    _need(not (m.variant == "skeletonclr" and m.swap_params),
          f"model.swap_params: the skeletonclr variant does not mix, but mixing rows were given: "
          f"{short(m.swap_params)}; to mix, set model.variant to skelemixclr or skelemixclr+, else drop swap_params")
    mixing = m.variant != "skeletonclr" if m.swap_params is None else bool(m.swap_params)
    if mixing:
        _need(d.frames % stride == 0, f"data.frames ({d.frames}) must be a multiple of the encoder's temporal "
                                      f"stride ({stride}) for SkeleMix regions to align with feature cells")
        _need(c.train.batch_size >= 2,
              f"train.batch_size: SkeleMix needs at least 2 samples per batch; got {c.train.batch_size}")
    rows = m.swap_params if m.swap_params is not None else VARIANTS[m.variant]["swap_params"]
    for row in rows:
        _need(isinstance(row, (list, tuple)) and len(row) == 6 and all(_is_int(v) for v in row[:5])
              and isinstance(row[5], (int, float)) and not isinstance(row[5], bool) and math.isfinite(row[5]),
              f"model.swap_params: each row is [spa_l, spa_u, tem_l, tem_u, repeat, weight] (five ints and a finite "
              f"number); got {short(row)}")
        blocks = SwapRow(*row).max_blocks
        _need(blocks * stride <= d.frames, f"model.swap_params: tem_u={blocks} blocks of {stride} frames exceed "
                                           f"data.frames={d.frames}")
    _need(len(rows) <= 1, "model.swap_params: several query views (rows) are not supported by the trainer yet")


def validate(c: Config) -> None:
    """Combinations that cannot work, caught before any data is read (the device, when "auto", and the number
    of processes are checked by the trainer)."""
    if c.model.layout != "auto":
        try:
            get_layout(c.model.layout)
        except (LayoutError, ValueError, OSError) as err:
            raise ConfigError(f"model.layout: {describe(err)}") from None
    _check_ranges(c)
    _need(c.model.queue_size % c.train.batch_size == 0,
          f"model.queue_size ({c.model.queue_size}) must be a multiple of train.batch_size ({c.train.batch_size}): "
          "the queue is filled one global batch of keys at a time")
    o = c.optim
    _need(not o.nesterov or (o.name == "sgd" and o.momentum > 0),
          f"optim.nesterov: needs optim.name sgd with optim.momentum > 0; got {o.name} with momentum {o.momentum}")
    _check_mixing(c)
    _need(not (c.train.cuda_graph == "on" and c.train.device == "cpu"),
          "train.cuda_graph=on: expected a CUDA device; got train.device cpu")


# ------------------------------------------------------------------------------------- using a config
def describe_variant(c: Config) -> str:
    """The pretraining method a config runs, by its variant name (and when mixing is switched off)."""
    m = c.model
    return f"{m.variant} without mixing (model.swap_params: [])" if m.swap_params == [] and \
        m.variant != "skeletonclr" else m.variant


def base_lr(c: Config) -> float:
    """The learning rate before the step schedule, by ``optim.lr_scaling``."""
    if c.optim.lr_scaling == "linear":
        return c.optim.lr * c.train.batch_size / c.optim.lr_reference_batch
    return c.optim.lr


def describe_batch_and_lr(c: Config, world_size: int) -> str:
    """One line stating the global batch, its split over processes and the lr rule (printed at start)."""
    t, o = c.train, c.optim
    rule = ("optim.lr as given" if o.lr_scaling == "none" else
            f"linear scaling: optim.lr {o.lr:g} x {t.batch_size} / {o.lr_reference_batch}")
    return (f"global batch {t.batch_size} = {world_size} process{'es' if world_size > 1 else ''} x "
            f"{t.batch_size // world_size}; base lr {base_lr(c):g} ({rule})"
            + (f"; BatchNorm {c.dist.bn}" if world_size > 1 else ""))


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None,
                notes: list[str] | None = None) -> Config:
    """The config of ``path`` (default: the built-in demo) with ``overrides`` applied (``notes``: see
    :func:`build_config`)."""
    return build_config(load_yaml(path if path is not None else "demo.yaml"), overrides, notes)


def resolve_device(name: str):
    """``auto`` -> cuda when available, else cpu; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but no CUDA device is visible")
    return device


def with_data_input(config: Config, meta: dict | None, source: str = "the data") -> Config:
    """``config`` with ``model.layout`` and ``model.channels`` taken from the data they will read: ``auto`` becomes
    the data's, and a value given must fit it (a layout of another skeleton with the same joints is fine).
    ``meta`` is a prepared dataset's ``meta.json``; None stands for the generated data (ntu-rgb+d, x, y, z)."""
    meta = meta or {}
    m = config.model
    data_layout = get_layout(meta.get("layout", "ntu-rgb+d"))
    data_channels = channels_of(meta, source)
    layout, channels = m.layout, m.channels
    if layout == "auto":
        layout = layout_value(data_layout)
    elif get_layout(layout).num_joints != data_layout.num_joints:
        given = get_layout(layout)
        raise ConfigError(f"model.layout: {given.name!r} has {given.num_joints} joints but {source} holds "
                          f"{data_layout.name!r} skeletons of {data_layout.num_joints} (set model.layout=auto to "
                          "take the data's)")
    if channels == "auto":
        channels = data_channels
    elif channels != data_channels:
        raise ConfigError(f"model.channels: the encoder takes {channels} but {source} holds {data_channels}")
    return dataclasses.replace(config, model=dataclasses.replace(m, layout=layout, channels=channels))


def model_input(model: ModelConfig) -> tuple[str | dict, str]:
    """``(layout, channels)`` of the encoder; ``auto`` (a config not yet fitted to data by :func:`with_data_input`)
    means those of the generated data: ``ntu-rgb+d`` and ``x,y,z``."""
    return ("ntu-rgb+d" if model.layout == "auto" else model.layout,
            "x,y,z" if model.channels == "auto" else model.channels)


def _part(model: ModelConfig, part: str) -> dict:
    """The fields of ``model`` marked ``_to(part)``, by their keyword names (None: left to the part's default)."""
    return {f.metadata["arg"] or f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.metadata.get("part") == part and getattr(model, f.name) is not None}


def encoder_kwargs(model: ModelConfig) -> dict:
    """The keyword arguments of :class:`~skelemix.models.STGCN` that ``model`` describes."""
    layout, channels = model_input(model)
    return dict(_part(model, "encoder"), in_channels=len(channels.split(",")),
                graph=dict(layout=layout, strategy=model.graph), fused_epilogue=model.epilogue == "fused")


def make_encoder(model: ModelConfig, num_class: int | None = None, head: str = "linear", impl: str = "auto"):
    """The ST-GCN encoder a config describes, for evaluation: ``num_class`` classes behind ``fc``, the ops of
    ``impl`` and the plain block epilogue."""
    return STGCN(**dict(encoder_kwargs(model), impl=impl, fused_epilogue=False), num_class=num_class, head=head)


def make_pretrain_model(config: Config):
    """The :class:`~skelemix.models.SkeleMixCLR` a config describes."""
    m = config.model
    return build_pretrain_model(m.variant, encoder=encoder_kwargs(m), mix=_part(m, "mix"), **_part(m, "objective"))
