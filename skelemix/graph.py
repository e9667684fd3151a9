"""Skeleton layouts and the adjacency partitions built from them (REFERENCE.md 2.1).

A layout is data: the joint count, the bones as (child, parent) pairs pointing toward the root, and the
body parts SkeleMix cuts along. Every strategy works for every layout, so adding a dataset means adding a
``Layout`` entry, not a code path.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    name: str
    num_joints: int
    bones: tuple[tuple[int, int], ...]  # 0-based (child, parent), parent is closer to `root`
    root: int  # the joint every bone points toward; the ST-GCN "center"
    body_parts: tuple[tuple[int, ...], ...]  # partition of all joints, in the order SkeleMix samples them
    part_names: tuple[str, ...]

    def __post_init__(self):
        joints = sorted(j for part in self.body_parts for j in part)
        if joints != list(range(self.num_joints)):
            raise ValueError(f"layout {self.name!r}: body_parts must partition joints 0..{self.num_joints - 1}")
        if len(self.bones) != self.num_joints - 1:
            raise ValueError(f"layout {self.name!r}: a tree over {self.num_joints} joints has "
                             f"{self.num_joints - 1} bones, got {len(self.bones)}")

    def parents(self) -> list[int]:
        """Parent of every joint; the root is its own parent (so its bone vector is zero)."""
        parent = list(range(self.num_joints))
        for child, par in self.bones:
            parent[child] = par
        return parent


def _zero_based(pairs):
    return tuple((a - 1, b - 1) for a, b in pairs)


NTU = Layout(
    name="ntu-rgb+d",
    num_joints=25,
    # 1-based (child -> parent toward joint 21, "spine shoulder"), as in the official ntu_rgb_d.py.
    bones=_zero_based([(1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21),
                       (10, 9), (11, 10), (12, 11), (13, 1), (14, 13), (15, 14), (16, 15), (17, 1),
                       (18, 17), (19, 18), (20, 19), (22, 23), (23, 8), (24, 25), (25, 12)]),
    root=20,
    # The official code's names and order (its left/right labels are swapped relative to NTU's naming;
    # harmless, the parts are sampled symmetrically). The order fixes which part each draw picks.
    body_parts=((3, 2, 20, 1, 0), (8, 9, 10, 11, 23, 24), (4, 5, 6, 7, 21, 22),
                (16, 17, 18, 19), (12, 13, 14, 15)),
    part_names=("trunk", "left_hand", "right_hand", "left_leg", "right_leg"),
)

NW_UCLA = Layout(
    name="nw-ucla",
    num_joints=20,
    # Kinect v1 joints, 1-based: 1 hip centre, 2 spine, 3 shoulder centre, 4 head, 5-8 left arm,
    # 9-12 right arm, 13-16 left leg, 17-20 right leg; bones point toward joint 3 (CTR-GCN's ucla graph).
    bones=_zero_based([(1, 2), (2, 3), (4, 3), (5, 3), (6, 5), (7, 6), (8, 7), (9, 3), (10, 9),
                       (11, 10), (12, 11), (13, 1), (14, 13), (15, 14), (16, 15), (17, 1), (18, 17),
                       (19, 18), (20, 19)]),
    root=2,
    body_parts=((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15), (16, 17, 18, 19)),
    part_names=("trunk", "left_arm", "right_arm", "left_leg", "right_leg"),
)

LAYOUTS = {layout.name: layout for layout in (NTU, NW_UCLA)}
STRATEGIES = ("agcn", "spatial", "distance", "uniform")


def get_layout(layout: str | Layout) -> Layout:
    if isinstance(layout, Layout):
        return layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}; got {layout!r}")
    return LAYOUTS[layout]


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
