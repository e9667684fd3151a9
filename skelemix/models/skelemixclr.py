"""The SkeleMixCLR objective: MoCo queue, momentum encoder, instance / trimmed / truncated logits
(docs/DESIGN.md 4).

One class covers the released variants; they differ only in their mixing rows (``swap_params``):

* ``skeletonclr``: no mixing, plain MoCo (the ablation baseline; head without BN as in ``skeletonclr.py``).
* ``skelemixclr``: one mixed sample per step, ``L = L_ins + alpha * (L_p + L_c) / 2`` (``skeletonclr_swap.py``).
* ``skelemixclr+``: per query view ``i`` and repeat ``r``:
  ``L = sum_i w_i L_ins,i + sum_i w_i reduce_r (L_p,r + L_c,r) / 2`` (``skeletonclr_multi_swapv2.py``).

Official behaviours that are bugs are fixed by default; where the fix changes numbers a flag brings the
official behaviour back: ``official_key_init`` (encoder_k starts from different random weights) and
``repeat_reduction="sum"`` (regional losses summed over repeats instead of averaged).
"""
from __future__ import annotations

import copy
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..graph import Graph
from ..mix import SkeleMix
from .stgcn import STGCN, init_weights


class SwapRow(NamedTuple):
    """One query view's mixing: a row ``[spa_l, spa_u, tem_l, tem_u, repeat, weight]`` of ``swap_params``."""

    min_parts: int  # spa_l, spa_u: the region spans this many body parts (inclusive range)
    max_parts: int
    min_blocks: int  # tem_l, tem_u: and this many blocks of the encoder's temporal stride (inclusive range)
    max_blocks: int
    repeats: int  # mixed copies of the view per step
    weight: float  # of the view's terms in the loss


# Default settings of each released variant; everything else comes from the constructor's defaults.
VARIANTS = {
    "skeletonclr": dict(swap_params=(), head="mlp_nobn"),
    "skelemixclr": dict(swap_params=((1, 4, 1, 15, 1, 1.0),), head="mlp"),
    "skelemixclr+": dict(swap_params=((2, 3, 7, 11, 3, 1.0),), head="mlp"),
}


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """The official multi-positive NCE with its one-hot positive mask is cross-entropy with target 0."""
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


class SkeleMixCLR(nn.Module):
    """MoCo + SkeleMix pretraining model.

    Args:
        encoder: keyword arguments of :class:`~skelemix.models.stgcn.STGCN` (without ``num_class``/``head``).
        feature_dim: projection size (128). ``queue_size``: K (32768). ``momentum``: m (0.999).
        temperature: tau (0.2 in the released config).
        swap_params: rows ``(spa_l, spa_u, tem_l, tem_u, repeat, weight)``, one per query view; empty for
            plain SkeletonCLR.
        head: ``"mlp"`` (Linear-BN-ReLU-Linear), ``"mlp_nobn"`` or ``"linear"``.
        alpha: extra weight of the regional terms (``--alpha`` of the single-mix code; 1).
        repeat_reduction: ``"mean"`` (default) or ``"sum"`` (official v2) over the repeats of a view.
        official_key_init: reproduce the official initialisation (encoder_k not a copy of encoder_q).
        mix: keyword arguments of :class:`~skelemix.mix.SkeleMix` besides ranges and block (``mode``,
            ``spatial_mode``, ``per_sample``, ``partner``, ``random_joints``).

    Under torch.distributed (:mod:`skelemix.distributed`) every rank passes its share of the global batch:
    the keys of all ranks are gathered and enqueued once, in rank order, so every rank keeps the same queue;
    ``shuffle_key_bn = True`` runs the key encoder with MoCo's shuffled BN. SkeleMix partners are drawn
    within each rank's batch.
    """

    def __init__(self, encoder: dict | None = None, feature_dim: int = 128, queue_size: int = 32768,
                 momentum: float = 0.999, temperature: float = 0.2,
                 swap_params: Sequence[Sequence[float]] = ((2, 3, 7, 11, 3, 1.0),), head: str = "mlp",
                 alpha: float = 1.0, repeat_reduction: str = "mean", official_key_init: bool = False,
                 mix: dict | None = None):
        super().__init__()
        if repeat_reduction not in ("mean", "sum"):
            raise ValueError(f"repeat_reduction must be 'mean' or 'sum'; got {repeat_reduction!r}")
        if queue_size < 1 or feature_dim < 1:
            raise ValueError(f"queue_size and feature_dim must be positive; got {queue_size}, {feature_dim}")
        encoder = dict(encoder or {})
        graph = encoder.pop("graph", None)
        graph = graph if isinstance(graph, Graph) else Graph(**(graph or {}))
        self.encoder_q = STGCN(num_class=feature_dim, head=head, graph=graph, **encoder)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.queue_size, self.momentum, self.temperature = queue_size, momentum, temperature
        self.alpha, self.repeat_reduction = alpha, repeat_reduction
        self.swap_params = [_swap_row(row) for row in swap_params]
        layout = graph.layout
        self.mixers = [SkeleMix(layout.body_parts, layout.num_joints, (row.min_parts, row.max_parts),
                                (row.min_blocks, row.max_blocks), block=self.encoder_q.temporal_stride,
                                impl=self.encoder_q.impl, **(mix or {})) for row in self.swap_params]
        self.register_buffer("queue", F.normalize(torch.randn(feature_dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

        if official_key_init:
            self.apply(init_weights)  # after the copy: the encoders start different, as in the official code
        else:
            self.encoder_q.apply(init_weights)
            self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.shuffle_key_bn = False  # MoCo shuffled BN for encoder_k across ranks (a no-op with one process)

    @torch.no_grad()
    def _momentum_update(self):
        q = [p.detach() for p in self.encoder_q.parameters()]
        k = list(self.encoder_k.parameters())
        torch._foreach_lerp_(k, q, 1.0 - self.momentum)  # k = m*k + (1-m)*q

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor):
        keys = distributed.all_gather(keys)  # every rank's keys in rank order: the global batch
        n = keys.shape[0]
        if self.queue_size % n:
            w = distributed.world_size()
            split = f" = {w} processes x {n // w}" if w > 1 else ""
            raise ValueError(f"queue_size ({self.queue_size}) must be a multiple of the global batch size "
                             f"({n}{split}): the queue is filled one global batch of keys at a time")
        # The pointer stays on the device: no host synchronisation (CUDA graphs replay this step as it is).
        index = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % self.queue_size
        self.queue.index_copy_(1, index, keys.T.to(self.queue.dtype))
        self.queue_ptr.add_(n).remainder_(self.queue_size)

    def _logits(self, feat: torch.Tensor, positive: torch.Tensor, queue: torch.Tensor,
                extra: torch.Tensor | None = None) -> torch.Tensor:
        cols = [(feat * positive).sum(1, keepdim=True), feat @ queue]
        if extra is not None:
            cols.append((feat * extra.detach()).sum(1, keepdim=True))
        return torch.cat(cols, dim=1) / self.temperature

    def draw_mixes(self, shape, generator=None) -> list[dict]:
        """The SkeleMix draws of one step (one dict per query view, see :meth:`SkeleMix.draw`) for queries of
        ``shape``, on the host: what :meth:`forward` draws from ``generator`` first."""
        return [mixer.draw(shape, row.repeats, generator) for mixer, row in zip(self.mixers, self.swap_params)]

    def forward(self, queries: torch.Tensor | Sequence[torch.Tensor], key: torch.Tensor, generator=None,
                mix_draws: Sequence[dict] | None = None) -> dict:
        """One pretraining step's loss.

        Args:
            queries: one ``(N, C, T, V, M)`` batch per query view (a tensor means one view).
            key: ``(N, C, T, V, M)``, an independent augmentation of the same samples.
            generator: torch generator for the mixing draws (the global RNG if None) and, with
                ``shuffle_key_bn``, the key shuffle.
            mix_draws: the mixing draws of :meth:`draw_mixes`, on the device: then nothing is drawn for the
                mixing (the result is that of drawing them here from the same generator state), and the forward,
                backward and enqueue never synchronise with the host, as CUDA graph capture needs.

        Returns a dict with ``loss`` (to backpropagate) and detached parts ``loss_ins``, ``loss_p``,
        ``loss_c`` (per-term means over views/mixes) and ``acc_ins`` (instance top-1 of the positive).
        """
        if isinstance(queries, torch.Tensor):
            queries = [queries]
        if self.swap_params and len(queries) != len(self.swap_params):
            raise ValueError(f"got {len(queries)} query views but swap_params has {len(self.swap_params)} rows")
        weights = [row.weight for row in self.swap_params] or [1.0] * len(queries)

        # Draw every mixed batch first (the official order of random draws), then run the encoders. The repeats
        # of a view come from one gather launch; each is still encoded on its own (BatchNorm statistics are
        # per batch of N).
        if mix_draws is None:
            mixed = [mixer.batches(q, row.repeats, generator)
                     for q, mixer, row in zip(queries, self.mixers, self.swap_params)]
        elif len(mix_draws) != len(self.mixers):
            raise ValueError(f"got mixing draws for {len(mix_draws)} query views; the model mixes {len(self.mixers)}")
        else:
            mixed = [mixer.apply(q, d) for q, mixer, d in zip(queries, self.mixers, mix_draws)]
        q_feats = [_unit(self.encoder_q(q)) for q in queries]
        pc_feats = [[tuple(_unit(f) for f in self.encoder_q(mb.x, mb.mask)) for mb in view] for view in mixed]
        with torch.no_grad():
            self._momentum_update()
            k = _unit(distributed.shuffled_forward(self.encoder_k, key, generator) if self.shuffle_key_bn
                      else self.encoder_k(key))
        queue = self.queue.clone().detach()
        # The logits and losses in float32 even under autocast: bf16 logits of size 1/T = 5 are off by ~0.03.
        with torch.autocast(key.device.type, enabled=False):
            return self._losses(q_feats, pc_feats, mixed, k, queue, weights)

    def _losses(self, q_feats, pc_feats, mixed, k, queue, weights) -> dict:
        """The instance and regional contrastive terms from unit features; enqueues the keys."""
        loss = k.new_zeros(())
        terms = {"ins": [], "p": [], "c": []}
        acc = []
        for w, q in zip(weights, q_feats):
            logits = self._logits(q, k, queue)
            term = contrastive_loss(logits)
            loss = loss + w * term
            terms["ins"].append(term.detach())
            acc.append((logits.argmax(1) == 0).float().mean())
        for w, view, feats in zip(weights, mixed, pc_feats):
            regional = []
            for mb, (p, c) in zip(view, feats):
                loss_c = contrastive_loss(self._logits(c, k, queue, extra=p))
                terms["c"].append(loss_c.detach())
                if mb.partner is None:  # zeros/gaussian fill: the region holds no sample, so no trimmed term
                    regional.append(loss_c)
                    continue
                loss_p = contrastive_loss(self._logits(p, k[mb.partner], queue, extra=c))
                terms["p"].append(loss_p.detach())
                regional.append(0.5 * (loss_p + loss_c))
            total = torch.stack(regional).sum()
            if self.repeat_reduction == "mean":
                total = total / len(regional)
            loss = loss + w * self.alpha * total

        self._enqueue(k)
        nan = k.new_full((), float("nan"))
        out = {f"loss_{name}": torch.stack(v).mean() if v else nan for name, v in terms.items()}
        out["loss"] = loss
        out["acc_ins"] = torch.stack(acc).mean()
        return out


def _swap_row(row: Sequence[float]) -> SwapRow:
    if len(row) != 6:
        raise ValueError(f"each swap_params row is (spa_l, spa_u, tem_l, tem_u, repeat, weight); got {tuple(row)}")
    row = SwapRow(*(int(v) for v in row[:5]), float(row[5]))
    if row.repeats < 1:
        raise ValueError(f"swap_params repeat must be >= 1; got {row.repeats}")
    return row


def _unit(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised features in float32 or wider (encoders may run in bf16 under autocast)."""
    return F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=1)


def build_pretrain_model(variant: str = "skelemixclr+", **kwargs) -> SkeleMixCLR:
    """A :class:`SkeleMixCLR` with a released variant's defaults; ``kwargs`` override them."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    return SkeleMixCLR(**{**VARIANTS[variant], **kwargs})
