"""The ST-GCN encoder of SkeleMixCLR (docs/DESIGN.md 2.2-2.5).

Module names follow the official ``net/st_gcn_swap.py`` where that costs nothing (``data_bn``, ``gcn.conv``,
``tcn.0/2/3``, ``residual.0/1``, ``fc``, buffer ``A``); the ten blocks live in ``blocks`` and each block
holds its own ``edge_importance``. :mod:`skelemix.checkpoint` maps the official keys onto these.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..graph import Graph


def block_plan(in_channels: int, hidden_channels: int, hidden_dim: int) -> list[tuple[int, int, int]]:
    """``(in, out, temporal stride)`` of the ten ST-GCN blocks."""
    hc = hidden_channels
    return [(in_channels, hc, 1), (hc, hc, 1), (hc, hc, 1), (hc, hc, 1), (hc, 2 * hc, 2),
            (2 * hc, 2 * hc, 1), (2 * hc, 2 * hc, 1), (2 * hc, 4 * hc, 2), (4 * hc, 4 * hc, 1),
            (4 * hc, hidden_dim, 1)]


# Frames per feature-map cell: SkeleMix regions are whole blocks of this many frames.
TEMPORAL_STRIDE = math.prod(stride for _, _, stride in block_plan(1, 1, 1))


class GraphConv(nn.Module):
    """1x1 convolution to ``K * out`` channels, then aggregation over the ``K`` adjacency subsets (through
    :func:`skelemix.ops.graph_conv` with implementation ``impl``)."""

    def __init__(self, in_channels: int, out_channels: int, num_subsets: int, impl: str = "auto"):
        super().__init__()
        self.num_subsets = num_subsets
        self.impl = impl
        self.conv = nn.Conv2d(in_channels, out_channels * num_subsets, kernel_size=1)

    def forward(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        weight = self.conv.weight.flatten(1)
        return ops.graph_conv(x, weight, self.conv.bias, A, impl=self.impl)


def batch_norm_epilogue(x: torch.Tensor, bn: nn.BatchNorm2d, residual: torch.Tensor | None = None, p: float = 0.0,
                        relu: bool = True, impl: str = "auto") -> torch.Tensor:
    """``relu(dropout_p(bn(x)) + residual)`` through :func:`skelemix.ops.bn_epilogue`, with ``bn``'s parameters
    and its statistics (batch statistics in training mode, which also updates the running ones exactly as
    ``nn.BatchNorm2d`` does)."""
    batch = bn.training or bn.running_mean is None
    weight = bn.weight if bn.affine else torch.ones(x.shape[1], device=x.device, dtype=ops.acc_dtype(x.dtype))
    bias = bn.bias if bn.affine else torch.zeros_like(weight)
    stats = (None, None) if batch else (bn.running_mean, bn.running_var)
    y, mean, var = ops.bn_epilogue(x, weight, bias, residual, *stats, eps=bn.eps, p=p, relu=relu, impl=impl)
    if bn.training and bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            n = x.numel() // x.shape[1]
            bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
            bn.running_var.mul_(1 - factor).add_(var * (n / max(n - 1, 1)), alpha=factor)
    return y


class STGCNBlock(nn.Module):
    """``relu(tcn(gcn(x)) + residual(x))`` with the official residual rule.

    ``fused``: the two BatchNorms of ``tcn``, its ReLU and dropout, the residual add and the final ReLU run as
    two :func:`skelemix.ops.bn_epilogue` calls; the modules only hold the parameters (the state dict is the
    same). Dropout then draws its mask from Philox4x32-10 keyed by a seed from torch's generator. BatchNorms
    replaced by another class (SyncBatchNorm) always run as modules. ``impl``: the implementation of the ops.
    """

    def __init__(self, in_channels: int, out_channels: int, num_subsets: int, num_joints: int, stride: int = 1,
                 dropout: float = 0.0, residual: bool = True, edge_importance: bool = True,
                 temporal_kernel: int = 9, impl: str = "auto", fused: bool = False):
        super().__init__()
        self.stride, self.impl, self.fused = stride, impl, fused
        self.gcn = GraphConv(in_channels, out_channels, num_subsets, impl)
        pad = (temporal_kernel - 1) // 2
        self.tcn = nn.Sequential(
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, (temporal_kernel, 1), (stride, 1), (pad, 0)),
            nn.BatchNorm2d(out_channels),
            nn.Dropout(dropout),
        )
        if not residual:
            self.residual = None
        elif in_channels == out_channels and stride == 1:
            self.residual = nn.Identity()
        else:
            self.residual = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=(stride, 1)),
                                          nn.BatchNorm2d(out_channels))
        self.edge_importance = (nn.Parameter(torch.ones(num_subsets, num_joints, num_joints))
                                if edge_importance else None)

    def forward(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        A_eff = A * self.edge_importance if self.edge_importance is not None else A
        g = self.gcn(x, A_eff)
        bn1, conv, bn2, dropout = self.tcn[0], self.tcn[2], self.tcn[3], self.tcn[4]
        if self.fused and type(bn1) is nn.BatchNorm2d and type(bn2) is nn.BatchNorm2d:
            z = conv(batch_norm_epilogue(g, bn1, impl=self.impl))
            residual = self.residual(x) if self.residual is not None else None
            p = dropout.p if dropout.training else 0.0
            return batch_norm_epilogue(z, bn2, residual, p=p, impl=self.impl)
        out = self.tcn(g)
        if self.residual is not None:
            out = out + self.residual(x)
        return torch.relu(out)


def mlp_head(in_dim: int, out_dim: int, batch_norm: bool = True) -> nn.Sequential:
    """The projection head: ``Linear-BN-ReLU-Linear`` (SkeleMixCLR, keys fc.0/1/3) or ``Linear-ReLU-Linear``
    (plain SkeletonCLR, keys fc.0/2)."""
    mid = [nn.BatchNorm1d(in_dim)] if batch_norm else []
    return nn.Sequential(nn.Linear(in_dim, in_dim), *mid, nn.ReLU(), nn.Linear(in_dim, out_dim))


class STGCN(nn.Module):
    """ST-GCN encoder.

    Args:
        in_channels: input channels per joint: 3 (x, y, z), or for 2-D keypoints 2 (x, y) or 3 (x, y, score).
        hidden_channels: width of the first blocks (16 in SkeleMixCLR, 64 for standard ST-GCN).
        hidden_dim: width of the last block and of the pooled feature (256).
        num_class: output size of ``fc``; ``None`` means no ``fc`` (forward returns pooled features).
        head: ``"linear"`` (``Linear(hidden_dim, num_class)``), ``"mlp"`` (with BN) or ``"mlp_nobn"``.
        dropout: dropout of blocks 1-9 (block 0 has none, as in the official code).
        edge_importance: learnable per-block edge weights (initialised to 1).
        graph: a :class:`Graph` or keyword arguments for one (default NTU, agcn).
        impl: implementation of the fused ops (see :mod:`skelemix.ops`).
        fused_epilogue: run each block's BatchNorms, dropout, residual add and ReLUs as
            :func:`skelemix.ops.bn_epilogue` (see :class:`STGCNBlock`). Off here, so that a bare encoder is the
            plain modules; the trainer's ``model.epilogue`` turns it on by default.

    ``forward(x)`` takes ``(N, C, T, V, M)`` and returns ``fc(pool(x))`` of shape ``(N, num_class)``;
    ``forward(x, mask)`` with a bool ``(G, T', V)`` mask at feature resolution (``G`` in ``{1, N}``) returns
    the trimmed/truncated pair ``(fc(p), fc(c))``. ``feature_map(x)`` gives ``(N*M, hidden_dim, T', V)``.
    """

    def __init__(self, in_channels: int = 3, hidden_channels: int = 16, hidden_dim: int = 256,
                 num_class: int | None = None, head: str = "linear", dropout: float = 0.5,
                 edge_importance: bool = True, graph: Graph | dict | None = None, impl: str = "auto",
                 fused_epilogue: bool = False):
        super().__init__()
        graph = graph if isinstance(graph, Graph) else Graph(**(graph or {}))
        self.graph = graph
        self.register_buffer("A", torch.tensor(graph.A, dtype=torch.float32))
        K, V = graph.num_subsets, graph.layout.num_joints
        self.in_channels = in_channels
        self.data_bn = nn.BatchNorm1d(in_channels * V)
        self.blocks = nn.ModuleList(
            STGCNBlock(cin, cout, K, V, stride, dropout=0.0 if i == 0 else dropout, residual=i > 0,
                       edge_importance=edge_importance)
            for i, (cin, cout, stride) in enumerate(block_plan(in_channels, hidden_channels, hidden_dim)))
        self.impl, self.fused_epilogue = impl, fused_epilogue
        self.hidden_dim = hidden_dim
        self.temporal_stride = math.prod(block.stride for block in self.blocks)
        if num_class is None:
            self.fc = None
        elif head == "linear":
            self.fc = nn.Linear(hidden_dim, num_class)
        elif head in ("mlp", "mlp_nobn"):
            self.fc = mlp_head(hidden_dim, num_class, batch_norm=head == "mlp")
        else:
            raise ValueError(f"head must be 'linear', 'mlp' or 'mlp_nobn'; got {head!r}")

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, impl: str):
        """Every op of the encoder runs with ``impl`` (the blocks hold it too)."""
        self._impl = ops.check_impl(impl)
        for module in self.modules():
            if isinstance(module, (GraphConv, STGCNBlock)):
                module.impl = self._impl

    @property
    def fused_epilogue(self) -> bool:
        return self._fused_epilogue

    @fused_epilogue.setter
    def fused_epilogue(self, fused: bool):
        self._fused_epilogue = bool(fused)
        for block in self.blocks:
            block.fused = self._fused_epilogue

    def _check_input(self, x: torch.Tensor):
        V = self.graph.layout.num_joints
        if x.dim() != 5 or x.shape[1] != self.in_channels or x.shape[3] != V:
            raise ValueError(f"x must have shape (N, {self.in_channels}, T, {V}, M); got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor; got {x.dtype}")

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, T, V, M)`` -> ``(N*M, hidden_dim, ceil(T / temporal_stride), V)``."""
        self._check_input(x)
        N, C, T, V, M = x.shape
        # data_bn channel index is v*C + c; both bodies share it.
        x = x.permute(0, 4, 3, 1, 2).reshape(N * M, V * C, T)
        x = self.data_bn(x)
        x = x.view(N, M, V, C, T).permute(0, 1, 3, 4, 2).reshape(N * M, C, T, V)
        for block in self.blocks:
            x = block(x, self.A)
        return x

    def pool(self, features: torch.Tensor, num_bodies: int, mask: torch.Tensor | None = None):
        """Pool a feature map over (T', V) and average the bodies: ``(N, C)``, or ``(p, c)`` with a mask."""
        B, C, T, V = features.shape
        if mask is None:
            region = torch.ones(1, T, V, dtype=torch.bool, device=features.device)
        else:
            if mask.dim() == 2:
                mask = mask.unsqueeze(0)
            N = B // num_bodies
            if mask.dtype != torch.bool or mask.shape[1:] != (T, V) or mask.shape[0] not in (1, N):
                raise ValueError(f"mask must be a bool tensor of shape (1 or {N}, {T}, {V}) at feature "
                                 f"resolution; got {mask.dtype} {tuple(mask.shape)}")
            region = mask.to(features.device)
        pooled = ops.mask_pool(features, region, impl=self.impl)
        pooled = pooled.view(B // num_bodies, num_bodies, 2, C).mean(1)
        return pooled[:, 0] if mask is None else (pooled[:, 0], pooled[:, 1])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        features = self.feature_map(x)
        pooled = self.pool(features, x.shape[-1], mask)
        if self.fc is None:
            return pooled
        if mask is None:
            return self.fc(pooled)
        p, c = pooled
        # The head sees p and c as two separate batches (its BatchNorm too), as in the official code.
        return self.fc(p), self.fc(c)


def init_weights(module: nn.Module) -> None:
    """The official ``weights_init``: conv/linear ~ N(0, 0.02), bias 0; BN weight ~ N(1, 0.02), bias 0.

    Apply with ``model.apply(init_weights)``; edge importances stay at 1.
    """
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
