"""Skeleton layouts and the adjacency partitions built from them (docs/DESIGN.md 2.1).

A layout is data, kept in a YAML file: the joints, the edges (bones) as (child, parent) pairs pointing toward
the centre joint, the body parts SkeleMix cuts along, and the joints that preprocessing aligns on. The shipped
ones live in ``skelemix/layouts/`` (``ntu-rgb+d``, ``nw-ucla``, ``coco-17``) and are read by the same code as
a user's file (``model.layout=path.yaml``), so adding a skeleton means writing a file, not a code path. Every
strategy works for every layout.

A layout file::

    name: my-skeleton
    joints: [pelvis, spine, head, ...]    # names (or a joint count); edges and parts use names or 0-based indices
    center: spine                         # every edge points toward it (the ST-GCN centre)
    edges: [[pelvis, spine], [head, spine], ...]   # [child, parent]: a tree over all joints
    parts: {trunk: [pelvis, spine, head], left_arm: [...], ...}   # SkeleMix's body parts: each joint in one
    origin: [pelvis]                      # preprocessing centres each frame on the mean of these (default: center)
    x_axis: [left_shoulder, right_shoulder]   # 3-D preprocessing turns this line onto +x (optional)

Files are untrusted input: they are read with ``yaml.safe_load``, size-limited, and every key is checked; a
mistake raises :class:`LayoutError`, one line naming the file, the key and what was expected.
"""
from __future__ import annotations

import difflib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .cli import short

LAYOUT_DIR = Path(__file__).parent / "layouts"
MAX_JOINTS = 1000
MAX_LAYOUT_BYTES = 1 << 20  # a layout of MAX_JOINTS named joints takes about 100 KB
_KEYS = ("name", "joints", "center", "edges", "parts", "origin", "x_axis")


class LayoutError(ValueError):
    """A layout that cannot be used; the message names its source and the key."""


@dataclass(frozen=True)
class Layout:
    name: str
    num_joints: int
    bones: tuple[tuple[int, int], ...]  # 0-based (child, parent), parent is closer to `root`: the file's edges
    root: int  # the joint every bone points toward; the ST-GCN "center"
    body_parts: tuple[tuple[int, ...], ...]  # partition of all joints, in the order SkeleMix samples them
    part_names: tuple[str, ...]
    joint_names: tuple[str, ...] = ()  # default: "0", "1", ...
    origin: tuple[int, ...] = ()  # preprocessing centres on the mean of these joints; default: (root,)
    x_axis: tuple[int, int] | None = None  # 3-D preprocessing rotates x_axis[1] - x_axis[0] onto +x

    def __post_init__(self):
        V = self.num_joints
        if not self.joint_names:
            object.__setattr__(self, "joint_names", tuple(str(j) for j in range(V)))
        if not self.origin:
            object.__setattr__(self, "origin", (self.root,))
        names = self.joint_names
        if len(names) != V:
            self._invalid(f"joints: {len(names)} names for {V} joints")
        used = [self.root, *self.origin, *(self.x_axis or ()), *(j for bone in self.bones for j in bone)]
        if not all(_is_int(j) and 0 <= j < V for j in used):
            self._invalid(f"center, edges, origin and x_axis must name joints 0..{V - 1}")
        joints = sorted(j for part in self.body_parts for j in part)
        if joints != list(range(V)):
            self._invalid(f"parts: body parts must partition joints 0..{V - 1} (each joint in exactly one part)"
                          f"{_partition_problem(joints, names)}")
        if len(self.part_names) != len(self.body_parts):
            self._invalid(f"parts: {len(self.part_names)} names for {len(self.body_parts)} parts")
        if len(self.bones) != V - 1:
            self._invalid(f"edges: a tree over {V} joints has {V - 1} edges (bones), got {len(self.bones)}")
        parent = {}
        for k, (child, par) in enumerate(self.bones):
            if child == self.root:
                self._invalid(f"edges[{k}]: the center {names[child]!r} has no parent (every edge points toward it)")
            if child == par:
                self._invalid(f"edges[{k}]: joint {names[child]!r} is its own parent")
            if child in parent:
                self._invalid(f"edges[{k}]: joint {names[child]!r} has a second parent ({names[parent[child]]!r} and "
                              f"{names[par]!r}): the edges must form a tree")
            parent[child] = par
        reaches_root = {self.root}  # every joint must: no cycles (each joint is walked once, so a file of
        for start in range(V):      # MAX_JOINTS joints in one long chain is checked as fast as a small one)
            path, j = [], start
            while j not in reaches_root:
                if j in path:
                    cycle = " -> ".join(names[i] for i in path[path.index(j):] + [j])
                    self._invalid(f"edges: the cycle {cycle} never reaches the center {names[self.root]!r}")
                path.append(j)
                j = parent[j]
            reaches_root.update(path)
        if len(set(self.origin)) != len(self.origin):
            self._invalid("origin: expected distinct joints")
        if self.x_axis is not None and (len(self.x_axis) != 2 or self.x_axis[0] == self.x_axis[1]):
            self._invalid("x_axis: expected two different joints [from, to]")

    def _invalid(self, detail: str):
        err = LayoutError(f"layout {self.name!r}: {detail}")
        err.detail = detail  # what _parse puts after the file name
        raise err

    def parents(self) -> list[int]:
        """Parent of every joint; the root is its own parent (so its bone vector is zero)."""
        parent = list(range(self.num_joints))
        for child, par in self.bones:
            parent[child] = par
        return parent

    def to_dict(self) -> dict:
        """The layout as the mapping of a layout file (joints by name), for configs and checkpoints."""
        n = self.joint_names
        spec = {"name": self.name, "joints": list(n), "center": n[self.root],
                "edges": [[n[c], n[p]] for c, p in self.bones],
                "parts": {name: [n[j] for j in part] for name, part in zip(self.part_names, self.body_parts)},
                "origin": [n[j] for j in self.origin]}
        if self.x_axis is not None:
            spec["x_axis"] = [n[j] for j in self.x_axis]
        return spec

    @classmethod
    def from_dict(cls, spec, source: str = "the layout") -> Layout:
        """A layout from the mapping of a layout file; :class:`LayoutError` names ``source`` and the key."""
        return _parse(spec, str(source))


def _partition_problem(joints: list[int], names) -> str:
    seen, doubled = set(), []
    for j in joints:
        if j in seen:
            doubled.append(j)
        seen.add(j)
    missing = [j for j in range(len(names)) if j not in seen]
    if missing:
        return f"; {names[missing[0]]!r} is in no part"
    if doubled:
        return f"; {names[doubled[0]]!r} is in two parts"
    return ""


def _parse(spec, source: str) -> Layout:
    """The layout a file's mapping describes, each key checked in turn; a mistake names ``source`` and the key."""
    _check_keys(spec, source)
    name = spec["name"]
    if not isinstance(name, str) or not name.strip() or not name.isprintable() or len(name) > 100:
        _fail(source, "name", f"expected a short printable name; got {short(name)}")
    joints = _JointRefs(_joint_names(spec["joints"], source), source)
    root = joints.one("center", spec["center"])
    bones = _bones(spec["edges"], joints)
    parts = spec["parts"]
    body_parts = _body_parts(parts, joints)
    origin = joints.many("origin", spec.get("origin", spec["center"]), allow_single=True)
    x_axis = spec.get("x_axis")
    if x_axis is not None:
        if not isinstance(x_axis, list) or len(x_axis) != 2:
            _fail(source, "x_axis", f"expected two joints [from, to]; got {short(x_axis)}")
        x_axis = joints.many("x_axis", x_axis)
    try:
        return Layout(name, len(joints.names), tuple(bones), root, tuple(body_parts), tuple(parts),
                      tuple(joints.names), origin, x_axis)
    except LayoutError as err:
        raise LayoutError(f"{source}: {err.detail}") from None


def _fail(source: str, key, message: str):
    raise LayoutError(f"{source}: {key}: {message}")


def _check_keys(spec, source: str) -> None:
    """A mapping with only known keys (the nearest one suggested) and every required one."""
    if not isinstance(spec, dict):
        raise LayoutError(f"{source}: expected a mapping with keys {', '.join(_KEYS)}; got {type(spec).__name__}")
    for key in spec:
        if key not in _KEYS:
            hint = difflib.get_close_matches(str(key), _KEYS, n=1)
            shown = key if isinstance(key, str) and key.isprintable() else short(key)
            _fail(source, shown, "unknown key" + (f"; did you mean {hint[0]!r}?" if hint else
                                                  f"; expected {', '.join(_KEYS)}"))
    for key in ("name", "joints", "center", "edges", "parts"):
        if key not in spec:
            _fail(source, key, "missing (a layout needs name, joints, center, edges and parts)")


def _joint_names(joints, source: str) -> list[str]:
    """The joint names of the ``joints`` key: its list of names, or "0", "1", ... for a count."""
    if _is_int(joints):
        names = [str(j) for j in range(joints)] if 1 <= joints <= MAX_JOINTS else None
    elif isinstance(joints, list) and all(isinstance(j, str) and j.strip() and j.isprintable() for j in joints):
        names = joints if 1 <= len(joints) <= MAX_JOINTS else None
    else:
        names = None
    if names is None:
        _fail(source, "joints", f"expected a list of 1 to {MAX_JOINTS} joint names (or their count); got "
                                f"{short(joints)}")
    if len(set(names)) != len(names):
        _fail(source, "joints", f"{next(j for j in names if names.count(j) > 1)!r} is named twice")
    return names


class _JointRefs:
    """The joints of a layout file: other keys refer to them by name or 0-based index."""

    def __init__(self, names: list[str], source: str):
        self.names, self.source = names, source
        self.index = {j: i for i, j in enumerate(names)}

    def one(self, key: str, ref) -> int:
        """The index of the joint ``ref`` names (by name or index); a mistake names ``key``."""
        if _is_int(ref) and 0 <= ref < len(self.names):
            return ref
        if isinstance(ref, str) and ref in self.index:
            return self.index[ref]
        hint = difflib.get_close_matches(ref, self.names, n=1) if isinstance(ref, str) else []
        _fail(self.source, key, f"{short(ref)} is not a joint of the layout (a name from 'joints' or an index 0.."
                                f"{len(self.names) - 1})" + (f"; did you mean {hint[0]!r}?" if hint else ""))

    def many(self, key: str, refs, allow_single: bool = False) -> tuple[int, ...]:
        """The indices of a non-empty list of distinct joints (or of one joint, with ``allow_single``)."""
        if allow_single and not isinstance(refs, list):
            refs = [refs]
        if not isinstance(refs, list) or not refs:
            _fail(self.source, key, f"expected a non-empty list of joints; got {short(refs)}")
        out = tuple(self.one(f"{key}[{i}]", r) for i, r in enumerate(refs))
        if len(set(out)) != len(out):
            _fail(self.source, key, "lists a joint twice")
        return out


def _bones(edges, joints: _JointRefs) -> list[tuple[int, int]]:
    """The ``edges`` key as (child, parent) joint indices."""
    if not isinstance(edges, list):
        _fail(joints.source, "edges", f"expected a list of [child, parent] pairs; got {short(edges)}")
    bones = []
    for k, edge in enumerate(edges):
        if not isinstance(edge, list) or len(edge) != 2:
            _fail(joints.source, f"edges[{k}]", f"expected a [child, parent] pair; got {short(edge)}")
        bones.append((joints.one(f"edges[{k}][0]", edge[0]), joints.one(f"edges[{k}][1]", edge[1])))
    return bones


def _body_parts(parts, joints: _JointRefs) -> list[tuple[int, ...]]:
    if not isinstance(parts, dict) or not parts:
        _fail(joints.source, "parts", f"expected a mapping of part names to joint lists; got {short(parts)}")
    body_parts = []
    for part, refs in parts.items():
        if not isinstance(part, str) or not part.strip() or not part.isprintable():
            _fail(joints.source, "parts", f"part names must be printable strings; got {short(part)}")
        body_parts.append(joints.many(f"parts.{part}", refs))
    return body_parts


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_layout(path: str | os.PathLike) -> Layout:
    """Read and check a layout file (``yaml.safe_load``; at most :data:`MAX_LAYOUT_BYTES`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"layout file not found: {path}" if not path.exists() else
                                f"layout file {path}: not a regular file")
    with open(path, "rb") as f:
        data = f.read(MAX_LAYOUT_BYTES + 1)
    if len(data) > MAX_LAYOUT_BYTES:
        raise LayoutError(f"{path}: larger than {MAX_LAYOUT_BYTES} bytes: not a layout file")
    try:
        spec = yaml.safe_load(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise LayoutError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise LayoutError(f"{path}{where}: not valid YAML: {getattr(err, 'problem', None) or err}") from None
    except RecursionError:
        raise LayoutError(f"{path}: not a layout file: nested too deeply") from None
    return _parse(spec, str(path))


LAYOUTS = {layout.name: layout for layout in map(load_layout, sorted(LAYOUT_DIR.glob("*.yaml")))}
NTU, NW_UCLA, COCO = LAYOUTS["ntu-rgb+d"], LAYOUTS["nw-ucla"], LAYOUTS["coco-17"]
STRATEGIES = ("agcn", "spatial", "distance", "uniform")


@functools.lru_cache(maxsize=64)
def _from_json(text: str) -> Layout:
    return _parse(json.loads(text), "the layout")


def layout_value(layout: str | os.PathLike | dict | Layout) -> str | dict:
    """How configs, meta.json files and checkpoints hold a layout: a shipped layout's name, else the mapping of
    its file (so they do not depend on the file)."""
    layout = get_layout(layout)
    return layout.name if LAYOUTS.get(layout.name) == layout else layout.to_dict()


def get_layout(layout: str | os.PathLike | dict | Layout) -> Layout:
    """A :class:`Layout` from a shipped layout's name, a layout file's path, the mapping of a layout file (as
    configs and checkpoints hold it) or a :class:`Layout`."""
    if isinstance(layout, Layout):
        return layout
    if isinstance(layout, dict):
        try:
            text = json.dumps(layout)
        except (TypeError, ValueError):
            raise LayoutError(f"the layout: expected the mapping of a layout file; got {short(layout)}") from None
        return _from_json(text)  # cached: called for every batch with the config's value
    if isinstance(layout, str) and layout in LAYOUTS:
        return LAYOUTS[layout]
    if isinstance(layout, (str, os.PathLike)) and (str(layout).endswith((".yaml", ".yml")) or Path(layout).is_file()):
        return load_layout(layout)
    raise ValueError(f"layout must be one of {sorted(LAYOUTS)} or a layout YAML file; got {short(layout)}")


def _edge2mat(pairs, n):
    m = np.zeros((n, n))
    for i, j in pairs:
        m[j, i] = 1
    return m


def normalize_digraph(a: np.ndarray) -> np.ndarray:
    """``a @ diag(1 / colsum(a))``; a zero column stays zero."""
    col = a.sum(0)
    inv = np.divide(1.0, col, out=np.zeros_like(col), where=col > 0)
    return a * inv[None, :]


def hop_distance(layout: Layout, max_hop: int = 1) -> np.ndarray:
    """Hop distance between joints, ``inf`` beyond ``max_hop`` (the ST-GCN graph.py definition)."""
    n = layout.num_joints
    adj = np.eye(n)
    for i, j in layout.bones:
        adj[i, j] = adj[j, i] = 1
    hop = np.full((n, n), np.inf)
    reach = np.stack([np.linalg.matrix_power(adj, d) for d in range(max_hop + 1)]) > 0
    for d in range(max_hop, -1, -1):
        hop[reach[d]] = d
    return hop


def _agcn(layout: Layout) -> np.ndarray:
    n = layout.num_joints
    inward = layout.bones
    outward = tuple((p, c) for c, p in inward)
    return np.stack([np.eye(n), normalize_digraph(_edge2mat(inward, n)), normalize_digraph(_edge2mat(outward, n))])


def _stgcn(layout: Layout, strategy: str, max_hop: int, dilation: int) -> np.ndarray:
    n, center = layout.num_joints, layout.root
    hop = hop_distance(layout, max_hop)
    valid = range(0, max_hop + 1, dilation)
    adjacency = np.zeros((n, n))
    for h in valid:
        adjacency[hop == h] = 1
    norm = normalize_digraph(adjacency)
    if strategy == "uniform":
        return norm[None]
    if strategy == "distance":
        return np.stack([np.where(hop == h, norm, 0.0) for h in valid])
    subsets = []
    to_center = hop[:, center]
    for h in valid:
        here = hop == h  # here[j, i]: joints j and i are h hops apart
        same = to_center[:, None] == to_center[None, :]
        closer = to_center[:, None] > to_center[None, :]  # j farther from the centre than i
        root = np.where(here & same, norm, 0.0)
        close = np.where(here & closer, norm, 0.0)
        further = np.where(here & ~same & ~closer, norm, 0.0)
        subsets += [root] if h == 0 else [root + close, further]
    return np.stack(subsets)


class Graph:
    """Adjacency subsets ``A`` of shape ``(K, V, V)`` for a layout.

    ``strategy="agcn"`` (default) is the three-subset 2s-AGCN graph SkeleMixCLR actually uses
    (identity, child->parent, normalised parent->children). ``"spatial" | "distance" | "uniform"`` are the
    original ST-GCN partitions (``max_hop``, ``dilation`` as in ST-GCN's graph.py).
    """

    def __init__(self, layout: str | Layout = "ntu-rgb+d", strategy: str = "agcn", max_hop: int = 1,
                 dilation: int = 1):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
        self.layout = get_layout(layout)
        self.strategy = strategy
        self.A = _agcn(self.layout) if strategy == "agcn" else _stgcn(self.layout, strategy, max_hop, dilation)

    @property
    def num_subsets(self) -> int:
        return self.A.shape[0]

    def __repr__(self):
        return f"Graph(layout={self.layout.name!r}, strategy={self.strategy!r}, A={tuple(self.A.shape)})"
