"""The code a user would otherwise run, laid out as the official SkeleMixCLR implementation is, for benchmarks
(the "official-style" provider) and interop tests. Not used by the package.

- :class:`OfficialModel`: the official ``net/st_gcn_swap.py`` module structure (state-dict names and forward):
  a 1x1 ``Conv2d`` then an einsum graph convolution, ``nn.Sequential`` temporal units with ``nn.Dropout``
  (torch's Bernoulli), masked pooling written as ``(x * mask).sum() / mask.sum()``.
- :class:`OfficialStyleSwap`: ``ske_swap`` as the official code writes it, drawn on every call: one cyclic
  partner shift from torch's global RNG, one region from Python's ``random``, a clone and an indexed copy.
- :func:`official_style_pretrain_model`: skelemix's SkeleMixCLR objective (queue, momentum encoder, losses)
  around those two, so that a step differs from skelemix's only where the implementations differ.

Written from docs/DESIGN.md 2.2 and 3.
"""
import copy
import random

import torch
from torch import nn

from skelemix.config import Config, make_pretrain_model
from skelemix.mix import MixedBatch


class Block(nn.Module):
    def __init__(self, cin, cout, K, stride, dropout, residual):
        super().__init__()
        self.gcn = nn.Module()
        self.gcn.conv = nn.Conv2d(cin, cout * K, 1)
        self.K = K
        self.tcn = nn.Sequential(nn.BatchNorm2d(cout), nn.ReLU(), nn.Conv2d(cout, cout, (9, 1), (stride, 1), (4, 0)),
                                 nn.BatchNorm2d(cout), nn.Dropout(dropout))
        self.kind = "none" if not residual else "identity" if cin == cout and stride == 1 else "conv"
        if self.kind == "conv":
            self.residual = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=(stride, 1)), nn.BatchNorm2d(cout))

    def forward(self, x, A):
        h = self.gcn.conv(x)
        n, kc, t, v = h.shape
        h = torch.einsum("nkctv,kvw->nctw", h.view(n, self.K, kc // self.K, t, v), A)
        res = {"none": 0, "identity": x}.get(self.kind) if self.kind != "conv" else self.residual(x)
        return torch.relu(self.tcn(h) + res)


class OfficialModel(nn.Module):
    def __init__(self, A, hc=16, hd=256, num_class=128, mlp=False, dropout=0.5):
        super().__init__()
        self.register_buffer("A", A.clone())
        K, V = A.shape[0], A.shape[1]
        self.data_bn = nn.BatchNorm1d(3 * V)
        plan = [(3, hc, 1), (hc, hc, 1), (hc, hc, 1), (hc, hc, 1), (hc, 2 * hc, 2), (2 * hc, 2 * hc, 1),
                (2 * hc, 2 * hc, 1), (2 * hc, 4 * hc, 2), (4 * hc, 4 * hc, 1), (4 * hc, hd, 1)]
        self.st_gcn_networks = nn.ModuleList(
            Block(i, o, K, s, 0 if n == 0 else dropout, n > 0) for n, (i, o, s) in enumerate(plan))
        self.fc = nn.Linear(hd, num_class)
        if mlp:
            self.fc = nn.Sequential(nn.Linear(hd, hd), nn.BatchNorm1d(hd), nn.ReLU(), self.fc)
        self.edge_importance = nn.ParameterList(nn.Parameter(torch.ones_like(A)) for _ in plan)

    def forward(self, x, mask=None):
        N, C, T, V, M = x.shape
        x = self.data_bn(x.permute(0, 4, 3, 1, 2).reshape(N * M, V * C, T))
        x = x.view(N, M, V, C, T).permute(0, 1, 3, 4, 2).reshape(N * M, C, T, V)
        for block, imp in zip(self.st_gcn_networks, self.edge_importance):
            x = block(x, self.A * imp)
        if mask is None:
            return self.fc(x.mean((2, 3)).view(N, M, -1).mean(1))
        p = (x * mask).sum((2, 3)) / mask.sum()
        c = (x * ~mask).sum((2, 3)) / (~mask).sum()
        return self.fc(p.view(N, M, -1).mean(1)), self.fc(c.view(N, M, -1).mean(1))


class OfficialStyleSwap:
    """``ske_swap`` with ``swap_mode='swap'``, ``spatial_mode='semantic'``, in blocks of 4 frames."""

    def __init__(self, body_parts, parts: tuple[int, int], blocks: tuple[int, int], block: int = 4):
        self.body_parts, self.parts, self.blocks, self.block = [list(p) for p in body_parts], parts, blocks, block

    def batches(self, x: torch.Tensor, repeats: int, generator=None) -> list[MixedBatch]:
        return [self.swap(x) for _ in range(repeats)]

    @torch.no_grad()
    def swap(self, x: torch.Tensor) -> MixedBatch:
        N, _, T, V, _ = x.shape
        shift = torch.randint(1, N - 1, (1,)).item()
        partner = (torch.arange(N, device=x.device) + shift) % N
        joints = sorted(j for part in random.sample(self.body_parts, random.randint(*self.parts)) for j in part)
        length = random.randint(*self.blocks)
        start = random.randint(0, T // self.block - length)
        frames = slice(self.block * start, self.block * (start + length))
        mixed = x.clone()
        mixed[:, :, frames, joints, :] = x[partner][:, :, frames, joints, :]
        mask = torch.zeros(T // self.block, V, dtype=torch.bool, device=x.device)
        mask[start:start + length, joints] = True
        return MixedBatch(mixed, mask, partner)


def official_style_pretrain_model(config: Config) -> nn.Module:
    """skelemix's SkeleMixCLR model for ``config`` with the official-style encoders and mixing swapped in."""
    model = make_pretrain_model(config)
    m = config.model
    A = model.encoder_q.A
    model.encoder_q = OfficialModel(A, m.hidden_channels, m.hidden_dim, m.feature_dim, mlp=True, dropout=m.dropout)
    model.encoder_k = copy.deepcopy(model.encoder_q).requires_grad_(False)
    model.mixers = [OfficialStyleSwap([part.nonzero().flatten().tolist() for part in mixer.parts], mixer.spa_range,
                                      mixer.tem_range, mixer.block) for mixer in model.mixers]
    return model
