"""Config files: YAML read as users write numbers, with bounded aliases and ``base:`` inheritance, and each value
checked against the annotation of the field it sets.

YAML is read as users write numbers (``1e-3``, ``1E5``, ``-.5`` are floats, as in YAML 1.2, where YAML 1.1 reads
them as strings), and documents that expand past :data:`MAX_YAML_NODES` values through aliases are refused.
:mod:`skelemix.config` turns what these functions read into a checked config.
"""
from __future__ import annotations

import functools
import math
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .cli import short

CONFIG_DIR = Path(__file__).parent / "configs"
MAX_YAML_NODES = 10_000  # values of one YAML document with its aliases expanded (a config has about 100)


class ConfigError(ValueError):
    """A config that cannot be used: the message names the file or key, the expected and the actual value."""


def list_configs() -> list[str]:
    """The shipped configs (names to pass as ``--config``)."""
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


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


def parse_yaml(text: str, source: str):
    """``text`` as YAML (1.2's floats, bounded aliases); a :class:`ConfigError` naming ``source`` otherwise."""
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
    raw = parse_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: base: expected the file name of another config, got "
                              f"{type(base).__name__} {short(base)}")
        raw = _merge(load_yaml(path.parent / base, (*_chain, path.resolve())), raw)
    return raw


def parse_override(text: str) -> tuple[str, object]:
    """``section.key=value`` with the value parsed as YAML (``3``, ``1e-3``, ``true``, ``[300]``, ``cuda``)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (e.g. train.epochs=10); got {short(text)}")
    key, value = text.split("=", 1)
    return key.strip(), parse_yaml(value, f"--set {short(key.strip())}")


@functools.cache
def hints(cls) -> dict[str, Any]:
    """The evaluated annotations of a dataclass's fields (cached)."""
    return get_type_hints(cls)


def _type_name(hint) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in get_args(hint))
    return "None" if hint is type(None) else getattr(get_origin(hint) or hint, "__name__", str(hint))


def _check_choice(key: str, value: Any, choices: tuple) -> Any:
    if isinstance(value, bool) and {"on", "off"} <= set(choices):  # YAML reads a bare on/off (yes/no) as a bool
        value = "on" if value else "off"
    if isinstance(value, bool) or value not in choices:  # (True == 1: a bool is never a choice)
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, choices))}; got {short(value)}")
    return value


def check_type(key: str, value: Any, hint) -> Any:
    """``value`` as the annotation ``hint`` takes it: one of its ``Literal`` choices; ints as floats where floats
    are expected (and whole floats such as ``1e5`` as ints where ints are); everything else that does not fit
    is refused, and so are non-finite floats (no key takes inf or nan)."""
    if get_origin(hint) is Literal:
        return _check_choice(key, value, get_args(hint))
    allowed = tuple(get_origin(t) or t for t in (get_args(hint) if get_origin(hint) in (Union, types.UnionType)
                                                else (hint,)))
    to_float = float in allowed and int not in allowed
    if to_float:
        allowed += (int,)
    elif int in allowed and isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        value = int(value)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {type(value).__name__} {short(value)}")
    if to_float and not isinstance(value, bool) and isinstance(value, (int, float)):
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
    return value
