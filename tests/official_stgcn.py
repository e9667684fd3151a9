"""A stand-in with the official ``net/st_gcn_swap.py`` module structure (state-dict names and forward),
written from docs/DESIGN.md 2.2 for interop tests. Not used by the package."""
import torch
from torch import nn


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
