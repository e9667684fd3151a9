"""Pretraining configuration: typed defaults, YAML files with ``base:`` inheritance, ``--set key=value``.

Every value is checked when the config is built: unknown keys (with the closest valid one), wrong types, values
out of range and impossible combinations raise :class:`ConfigError` naming the key, the expected and the actual
value. YAML is read as users write numbers (``1e-3``, ``1E5``, ``-.5`` are floats, as in YAML 1.2, where YAML
1.1 reads them as strings), and documents that expand past :data:`MAX_YAML_NODES` values through aliases are
refused.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .cli import describe, short
from .distributed import BACKENDS, BN_MODES
from .data.prepared import CHANNELS, channels_of
from .graph import LAYOUTS, STRATEGIES, LayoutError, get_layout, layout_value
from .mix import MODES, PARTNERS, SPATIAL_MODES
from .models.skelemixclr import VARIANTS
from .ops import IMPLS

CONFIG_DIR = Path(__file__).parent / "configs"
MAX_YAML_NODES = 10_000  # values of one YAML document with its aliases expanded (a config has about 100)
MAX_SEED = 2**32 - 1  # numpy's limit


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    root: str = "synthetic"  # a prepared dataset folder, or "synthetic" for generated data held in memory
    train_split: str = "train"
    val_split: str = "val"
    view: str = "joint"  # joint | motion | bone
    frames: int = 64  # must match the prepared data
    shear: float = 0.5  # shear amplitude of the pretraining augmentation (<= 0: off)
    temporal_ratio: int = 6  # mirrored temporal shift of up to frames // ratio (<= 0: off)
    synthetic_train: int = 880  # sizes of the generated splits when root == "synthetic"
    synthetic_val: int = 440
    synthetic_seed: int = 0


@dataclass
class ModelConfig:
    variant: str = "skelemixclr+"  # skeletonclr | skelemixclr | skelemixclr+
    # The skeleton: "auto" (the data's), a shipped layout (ntu-rgb+d, nw-ucla, coco-17) or a layout file, which
    # the built config holds as its mapping (so saved configs and checkpoints do not depend on the file).
    layout: str | dict = "auto"
    channels: str = "auto"  # the input channels: auto (the data's) | x,y,z | x,y | x,y,score
    graph: str = "agcn"
    hidden_channels: int = 16
    hidden_dim: int = 256
    dropout: float = 0.5
    edge_importance: bool = True
    feature_dim: int = 128
    queue_size: int = 32768
    momentum: float = 0.999
    temperature: float = 0.2
    swap_params: list | None = None  # rows [spa_l, spa_u, tem_l, tem_u, repeat, weight]; None: the variant's
    head: str | None = None  # mlp | mlp_nobn | linear; None: the variant's
    alpha: float = 1.0
    repeat_reduction: str = "mean"  # "sum" reproduces the official SkeleMixCLR+ weighting
    official_key_init: bool = False
    mix_mode: str = "swap"
    spatial_mode: str = "semantic"
    per_sample: bool = False
    partner: str = "shift"


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (the paper's) | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    steps: list = field(default_factory=lambda: [300])  # lr *= 0.1 after each of these (1-based) epochs
    # The base lr rule: "none" uses lr as given; "linear" uses lr * train.batch_size / lr_reference_batch (the
    # linear scaling rule, for a global batch changed from the one lr was tuned for).
    lr_scaling: str = "none"
    lr_reference_batch: int = 128


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 128  # the global batch: split evenly over the processes of a torchrun launch
    workers: int = 4
    seed: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    impl: str = "auto"
    # "fused": each ST-GCN block runs its BatchNorms, dropout, residual add and ReLUs as two bn_epilogue calls
    # (dropout masks from a counter hash; 1.85x the eager CPU step instead of 1.28x). "modules" (default): the
    # plain modules and torch's dropout: with the hashed masks the demo's pretraining left its loss plateau
    # in 2 of 6 runs against 11 of 11 with generator-drawn masks (docs/PERFORMANCE.md); fused stays opt-in
    # until a proper counter RNG replaces the hash.
    epilogue: str = "modules"  # modules | fused
    # The fast path. data_placement "device": keep the training set on the device and index batches there
    # (no DataLoader workers, no per-sample CPU work); "host": a DataLoader; "auto": device for a CUDA device
    # when the data takes under half its free memory. amp: bf16 autocast of the encoders (none by default
    # until GPU runs have validated it). cuda_graph: capture the whole training step (augmentation, mixing,
    # both encoders, losses, backward, optimizer step, momentum update, enqueue) as one CUDA graph and replay
    # it every step; the random draws stay on the host (the same generator, the same order). "on" needs one
    # CUDA process; "auto" means off until a GPU run has validated it (as amp).
    data_placement: str = "auto"  # auto | device | host
    amp: str = "none"  # none | bf16
    cuda_graph: str = "auto"  # auto | on | off
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
    backend: str = "auto"  # auto (nccl for GPUs, gloo for CPUs) | nccl | gloo
    # BatchNorm statistics: per_rank (over each process's share of the batch, the paper's single-GPU
    # statistics when that share is the paper's batch) | sync (over the global batch) | shuffle (per rank,
    # with MoCo's cross-rank shuffle of the key encoder's batch)
    bn: str = "per_rank"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "data.view": ("joint", "motion", "bone"),
    "model.variant": tuple(VARIANTS),
    "model.channels": ("auto", *CHANNELS),
    "model.graph": STRATEGIES,
    "model.head": (None, "mlp", "mlp_nobn", "linear"),
    "model.repeat_reduction": ("mean", "sum"),
    "model.mix_mode": MODES,
    "model.spatial_mode": SPATIAL_MODES,
    "model.partner": PARTNERS,
    "train.impl": IMPLS,
    "train.epilogue": ("modules", "fused"),
    "train.data_placement": ("auto", "device", "host"),
    "train.amp": ("none", "bf16"),
    "train.cuda_graph": ("auto", "on", "off"),
    "optim.name": ("sgd", "adamw"),
    "optim.lr_scaling": ("none", "linear"),
    "dist.backend": BACKENDS,
    "dist.bn": BN_MODES,
}


_ON_OFF = ("train.cuda_graph",)  # str keys with on/off values


def _check_type(key: str, value: Any, hint) -> Any:
    """Coerce ints to floats where floats are expected (and whole floats such as ``1e5`` to ints where ints are);
    reject everything else that does not fit, and non-finite floats (no key takes inf or nan)."""
    allowed = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "list": (list,),
               "list | None": (list, type(None)), "str | None": (str, type(None)), "str | dict": (str, dict)}[hint]
    if hint == "int" and isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        value = int(value)
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        raise ConfigError(f"{key}: expected {hint}, got {type(value).__name__} {short(value)}")
    if hint == "float" and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value}")
    return float(value) if hint == "float" else value


def _sections():
    return [f.name for f in dataclasses.fields(Config)]


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load`` with YAML 1.2's floats and a bound on what aliases expand to."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node


# Floats YAML 1.1 reads as strings: an exponent without a sign or without a dot (1e-3, 1.0e9, 1E5) and a
# signed leading dot (-.5). Tried after YAML 1.1's own int and float patterns, so ints stay ints.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$"), list("-+.0123456789"))


class _AliasBomb(yaml.YAMLError):
    pass


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand it past MAX_YAML_NODES values, or that contains itself: the
    values it would build are shared, but printing, copying or validating them walks every expansion."""
    sizes: dict[int, int | None] = {}  # node id -> expanded size; None while its children are counted

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            if sizes[key] is None:
                raise _AliasBomb("contains a value that contains itself through an alias (*name)")
            return sizes[key]
        sizes[key] = None
        children = (node.value if isinstance(node, yaml.SequenceNode) else
                    [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        total = 1 + sum(size(child) for child in children)
        if total > MAX_YAML_NODES:
            raise _AliasBomb(f"expands to more than {MAX_YAML_NODES} values through its aliases (*name); a config "
                             "needs about 100")
        sizes[key] = total
        return total

    size(root)


def _parse_yaml(text: str, source: str):
    try:
        return yaml.load(text, Loader=_Loader)
    except _AliasBomb as err:
        raise ConfigError(f"{source}: refusing this YAML: it {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{source}: refusing this YAML: it is nested too deeply") from None


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a config file, resolving ``base: other.yaml`` (relative to the file) recursively."""
    path = Path(path)
    if not path.is_file() and (CONFIG_DIR / path).is_file():
        path = CONFIG_DIR / path
    if not path.is_file():
        where = f"{_chain[-1]}: base: " if _chain else ""
        raise ConfigError(f"{where}config file not found: {path} (shipped configs: {', '.join(list_configs())})")
    if path.resolve() in _chain:
        cycle = [*_chain[_chain.index(path.resolve()):], path.resolve()]
        raise ConfigError(f"{_chain[-1]}: base: the configs inherit from each other in a cycle: "
                          f"{' -> '.join(map(str, cycle))}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file ({err.reason} at byte {err.start})") from None
    raw = _parse_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: base: expected the file name of another config, got "
                              f"{type(base).__name__} {short(base)}")
        raw = _merge(load_yaml(path.parent / base, (*_chain, path.resolve())), raw)
    return raw


def list_configs() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with the value parsed as YAML (``3``, ``1e-3``, ``true``, ``[300]``, ``cuda``)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (e.g. train.epochs=10); got {short(text)}")
    key, value = text.split("=", 1)
    return key.strip(), _parse_yaml(value, f"--set {short(key.strip())}")


def build_config(raw: dict | None = None, overrides: list[str] | dict | None = None) -> Config:
    """A validated :class:`Config` from a nested mapping plus ``section.key`` overrides."""
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"the config: expected a mapping of sections, got {type(raw).__name__} {short(raw)}")
    raw = dict(raw or {})
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for dotted, value in items:
        if dotted.count(".") != 1:
            raise ConfigError(f"override keys look like section.key (e.g. train.epochs); got {short(dotted)}")
        section, key = dotted.split(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping")
        raw[section] = {**raw[section], key: value}

    sections = _sections()
    built = {}
    for section, values in raw.items():
        if section not in sections:
            hint = difflib.get_close_matches(str(section), sections, n=1)
            raise ConfigError(f"unknown config section {short(section)}" + (f"; did you mean {hint[0]!r}?" if hint
                                                                              else f"; valid: {', '.join(sections)}"))
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {type(values).__name__}")
        cls = get_type_hints(Config)[section]
        hints = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                hint = difflib.get_close_matches(str(key), hints, n=1)
                name = key if isinstance(key, str) else short(key)
                raise ConfigError(f"unknown config key {section}.{name}" + (f"; did you mean {section}.{hint[0]}?"
                                                                            if hint else f"; valid: {', '.join(hints)}"))
            full = f"{section}.{key}"
            if full in _ON_OFF and isinstance(value, bool):  # YAML reads a bare on/off (and yes/no) as a bool
                value = "on" if value else "off"
            value = _check_type(full, value, hints[key])
            if full in _CHOICES and value not in _CHOICES[full]:
                raise ConfigError(f"{full}: expected one of {', '.join(map(str, _CHOICES[full]))}; got {short(value)}")
            kwargs[key] = value
        built[section] = cls(**kwargs)
    config = Config(**built)
    validate(config)
    if config.model.layout != "auto":  # a file is held as its mapping
        config.model.layout = layout_value(config.model.layout)
    return config


def validate(c: Config) -> None:
    """Combinations that cannot work, caught before any data is read."""
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    t, m, d, o = c.train, c.model, c.data, c.optim
    if m.layout != "auto":
        try:
            get_layout(m.layout)
        except (LayoutError, ValueError, OSError) as err:
            raise ConfigError(f"model.layout: {describe(err)}") from None
    for key, value in (("train.epochs", t.epochs), ("train.batch_size", t.batch_size), ("data.frames", d.frames),
                       ("model.hidden_channels", m.hidden_channels), ("model.hidden_dim", m.hidden_dim),
                       ("model.feature_dim", m.feature_dim), ("model.queue_size", m.queue_size),
                       ("optim.lr_reference_batch", o.lr_reference_batch)):
        need(value >= 1, f"{key}: must be >= 1; got {value}")
    for key, value in (("train.workers", t.workers), ("train.save_interval", t.save_interval),
                       ("train.knn_interval", t.knn_interval), ("optim.weight_decay", o.weight_decay),
                       ("optim.momentum", o.momentum), ("model.alpha", m.alpha),
                       ("data.synthetic_seed", d.synthetic_seed)):
        need(value >= 0, f"{key}: must be >= 0; got {value}")
    if d.root == "synthetic":
        for key, value in (("data.synthetic_train", d.synthetic_train), ("data.synthetic_val", d.synthetic_val)):
            need(value >= 1, f"{key}: must be >= 1; got {value}")
    if t.final_linear_eval:
        need(t.linear_epochs >= 1, f"train.linear_epochs: must be >= 1; got {t.linear_epochs}")
    need(0 <= t.seed <= MAX_SEED, f"train.seed: must be in [0, {MAX_SEED}]; got {t.seed}")
    need(m.queue_size % t.batch_size == 0,
         f"model.queue_size ({m.queue_size}) must be a multiple of train.batch_size ({t.batch_size}): the queue "
         "is filled one global batch of keys at a time")
    need(0 <= m.dropout < 1, f"model.dropout: must be in [0, 1); got {m.dropout}")
    need(0 <= m.momentum <= 1, f"model.momentum: must be in [0, 1]; got {m.momentum}")
    need(m.temperature > 0, f"model.temperature: must be > 0; got {m.temperature}")
    need(t.knn_t > 0, f"train.knn_t: must be > 0; got {t.knn_t}")
    need(o.lr > 0, f"optim.lr: must be > 0; got {o.lr}")
    need(not o.nesterov or (o.name == "sgd" and o.momentum > 0),
         f"optim.nesterov: needs optim.name sgd with optim.momentum > 0; got {o.name} with momentum {o.momentum}")
    need(all(_is_int(s) and s >= 0 for s in o.steps), f"optim.steps: expected a list of epochs; got {short(o.steps)}")
    need(all(_is_int(k) and k >= 1 for k in t.knn_k), f"train.knn_k: expected positive ints; got {short(t.knn_k)}")
    need(not (m.variant == "skeletonclr" and m.swap_params),
         f"model.swap_params: the skeletonclr variant does not mix, but mixing rows were given: "
         f"{short(m.swap_params)}; to mix, set model.variant to skelemixclr or skelemixclr+, else drop swap_params")
    stride = 4  # the ST-GCN encoder's total temporal stride
    mixing = m.variant != "skeletonclr" if m.swap_params is None else bool(m.swap_params)
    if mixing:
        need(d.frames % stride == 0, f"data.frames ({d.frames}) must be a multiple of the encoder's temporal stride "
                                     f"({stride}) for SkeleMix regions to align with feature cells")
        need(t.batch_size >= 2, f"train.batch_size: SkeleMix needs at least 2 samples per batch; got {t.batch_size}")
    rows = m.swap_params if m.swap_params is not None else VARIANTS[m.variant]["swap_params"]
    for row in rows:
        need(isinstance(row, (list, tuple)) and len(row) == 6 and all(_is_int(v) for v in row[:5])
             and isinstance(row[5], (int, float)) and not isinstance(row[5], bool) and math.isfinite(row[5]),
             f"model.swap_params: each row is [spa_l, spa_u, tem_l, tem_u, repeat, weight] (five ints and a finite "
             f"number); got {short(row)}")
        need(row[3] * stride <= d.frames, f"model.swap_params: tem_u={row[3]} blocks of {stride} frames exceed "
                                         f"data.frames={d.frames}")
    need(len(rows) <= 1, "model.swap_params: several query views (rows) are not supported by the trainer yet")
    # The device, when "auto", and the number of processes are checked by the trainer.
    need(not (t.cuda_graph == "on" and t.device == "cpu"), "train.cuda_graph=on: expected a CUDA device; got "
                                                           "train.device cpu")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """The config of ``path`` (default: the built-in demo) with ``overrides`` applied."""
    return build_config(load_yaml(path if path is not None else "demo.yaml"), overrides)


def resolve_device(name: str):
    """``auto`` -> cuda when available, else cpu; an explicit CUDA device must exist."""
    import torch

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


def make_encoder(model: ModelConfig, num_class: int | None = None, head: str = "linear", impl: str = "auto"):
    """The ST-GCN encoder a config describes (for evaluation: ``num_class`` classes behind a linear ``fc``)."""
    from .models import STGCN

    layout, channels = model_input(model)
    return STGCN(in_channels=len(channels.split(",")), hidden_channels=model.hidden_channels,
                 hidden_dim=model.hidden_dim, num_class=num_class, head=head, dropout=model.dropout,
                 edge_importance=model.edge_importance, graph=dict(layout=layout, strategy=model.graph), impl=impl)


def make_pretrain_model(config: Config):
    """The :class:`~skelemix.models.SkeleMixCLR` a config describes."""
    from .models import build_pretrain_model

    m = config.model
    layout, channels = model_input(m)
    overrides = {k: v for k, v in (("swap_params", m.swap_params), ("head", m.head)) if v is not None}
    return build_pretrain_model(
        m.variant, encoder=dict(in_channels=len(channels.split(",")), hidden_channels=m.hidden_channels,
                                hidden_dim=m.hidden_dim, dropout=m.dropout,
                                edge_importance=m.edge_importance, graph=dict(layout=layout, strategy=m.graph),
                                impl=config.train.impl,
                                fused_epilogue=config.train.epilogue == "fused"),
        feature_dim=m.feature_dim, queue_size=m.queue_size, momentum=m.momentum, temperature=m.temperature,
        alpha=m.alpha, repeat_reduction=m.repeat_reduction, official_key_init=m.official_key_init,
        mix=dict(mode=m.mix_mode, spatial_mode=m.spatial_mode, per_sample=m.per_sample, partner=m.partner),
        **overrides)
