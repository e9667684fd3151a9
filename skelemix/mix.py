"""SkeleMix: cut body-part x time-block fragments from a partner sequence and paste them (docs/DESIGN.md 3).

The defaults are the official ones: one region and one cyclic partner shift shared by the whole batch.
``per_sample=True`` draws a region per sample and ``partner="derangement"`` a random fixed-point-free
permutation. All randomness comes from one torch generator (the global one unless given), drawn on the
CPU, so a seed reproduces the same regions on every device. ``SkeleMix.batches`` builds several mixed copies
of a batch with one :func:`skelemix.ops.skelemix_gather` launch; it is ``SkeleMix.draw`` (the host part)
followed by ``SkeleMix.apply`` (the device part), which the trainer also calls separately.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import ops, reference

MODES = ("swap", "zeros", "gaussian")
SPATIAL_MODES = ("semantic", "random")
PARTNERS = ("shift", "derangement")


@dataclass
class MixedBatch:
    x: torch.Tensor  # (N, C, T, V, M) mixed sequences (with mode="swap", a view of all repeats' batch)
    mask: torch.Tensor  # (G, T // block, V) bool at feature resolution; True = pasted ("trimmed" view)
    partner: torch.Tensor | None  # (N,) int64 source of the pasted fragment; None for zeros/gaussian


def _randint(low: int, high: int, size: int, generator) -> torch.Tensor:
    """Uniform integers in [low, high] inclusive."""
    return torch.randint(low, high + 1, (size,), generator=generator)


class SkeleMix:
    """Sample SkeleMix regions and partners and build mixed batches.

    Args:
        body_parts: joint index groups the spatial region is made of (``Layout.body_parts``).
        num_joints: V.
        spa_range: inclusive range of the number of body parts (``spatial_mode="semantic"``).
        tem_range: inclusive range of the region's length in blocks of ``block`` frames.
        block: frames per temporal block; must equal the encoder's total temporal stride so the region
            maps exactly onto feature-map cells.
        mode: ``"swap"`` pastes the partner's fragment; ``"zeros"``/``"gaussian"`` fill the region instead.
        spatial_mode: ``"semantic"`` (union of body parts) or ``"random"`` (``random_joints`` joints).
        per_sample: one region per sample instead of one for the batch.
        partner: ``"shift"`` (one cyclic shift by 1..N-1 for the batch) or ``"derangement"``.
        impl: implementation of the gather op.
    """

    def __init__(self, body_parts: Sequence[Sequence[int]], num_joints: int, spa_range=(2, 3), tem_range=(7, 11),
                 block: int = 4, mode: str = "swap", spatial_mode: str = "semantic", random_joints=(10, 15),
                 per_sample: bool = False, partner: str = "shift", impl: str = "auto"):
        for name, value, allowed in (("mode", mode, MODES), ("spatial_mode", spatial_mode, SPATIAL_MODES),
                                     ("partner", partner, PARTNERS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        spa_lo, spa_hi = spa_range
        if not 1 <= spa_lo <= spa_hi <= len(body_parts):
            raise ValueError(f"spa_range must satisfy 1 <= low <= high <= {len(body_parts)} (body parts); "
                             f"got {tuple(spa_range)}")
        if not 1 <= tem_range[0] <= tem_range[1]:
            raise ValueError(f"tem_range must satisfy 1 <= low <= high; got {tuple(tem_range)}")
        if not 1 <= random_joints[0] <= random_joints[1] <= num_joints:
            raise ValueError(f"random_joints must lie in [1, {num_joints}]; got {tuple(random_joints)}")
        if block < 1:
            raise ValueError(f"block must be >= 1; got {block}")
        membership = torch.zeros(len(body_parts), num_joints, dtype=torch.bool)
        for i, part in enumerate(body_parts):
            membership[i, list(part)] = True
        self.parts = membership  # (P, V)
        self.num_joints = num_joints
        self.spa_range, self.tem_range, self.random_joints = tuple(spa_range), tuple(tem_range), tuple(random_joints)
        self.block, self.mode, self.spatial_mode = block, mode, spatial_mode
        self.per_sample, self.partner, self.impl = per_sample, partner, ops.check_impl(impl)

    def sample_partner(self, n: int, generator=None) -> torch.Tensor:
        """Partner of every sample; never the sample itself."""
        if n < 2:
            raise ValueError(f"SkeleMix needs a batch of at least 2 samples to pick partners; got {n}")
        idx = torch.arange(n)
        if self.partner == "shift":
            return (idx + _randint(1, n - 1, 1, generator)) % n
        while True:  # a uniform derangement by rejection: about e tries on average
            perm = torch.randperm(n, generator=generator)
            if not (perm == idx).any():
                return perm

    def sample_region(self, groups: int, blocks: int, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``groups`` regions of a sequence of ``blocks`` blocks: ``joints (groups, V)`` bool and
        ``span (groups, 2)`` int64 ``[start, end)`` in blocks. The region is joints x blocks."""
        lo, hi = self.tem_range
        if hi > blocks:
            raise ValueError(f"tem_range {self.tem_range} asks for up to {hi} blocks but the sequence has only "
                             f"{blocks} blocks of {self.block} frames")
        V = self.num_joints
        if self.spatial_mode == "semantic":
            count = _randint(*self.spa_range, groups, generator)
            order = torch.rand(groups, self.parts.shape[0], generator=generator).argsort(1)
            chosen = torch.arange(self.parts.shape[0])[None] < count[:, None]  # first `count` of a random order
            picked = torch.zeros(groups, self.parts.shape[0], dtype=torch.bool).scatter(1, order, chosen)
            joints = (picked[:, :, None] & self.parts[None]).any(1)
        else:
            count = _randint(*self.random_joints, groups, generator)
            order = torch.rand(groups, V, generator=generator).argsort(1)
            joints = torch.zeros(groups, V, dtype=torch.bool).scatter(1, order, torch.arange(V)[None] < count[:, None])
        length = _randint(lo, hi, groups, generator)
        start = (torch.rand(groups, generator=generator) * (blocks - length + 1)).floor().long()
        return joints, torch.stack((start, start + length), dim=1)

    def sample_mask(self, groups: int, blocks: int, generator=None) -> torch.Tensor:
        """``(groups, blocks, V)`` bool region at block (= feature) resolution (same draws as
        :meth:`sample_region`)."""
        joints, span = self.sample_region(groups, blocks, generator)
        return reference.block_region(joints, span, blocks)

    def __call__(self, x: torch.Tensor, generator=None) -> MixedBatch:
        """Mix a batch ``(N, C, T, V, M)``; ``T`` must be a multiple of ``block``."""
        return self.batches(x, 1, generator)[0]

    def batches(self, x: torch.Tensor, repeats: int, generator=None) -> list[MixedBatch]:
        """``repeats`` independently mixed copies of a batch ``(N, C, T, V, M)``, in one gather launch.

        The random draws are those of ``repeats`` calls of ``self(x, generator)`` in a row (partner, then
        region, per repeat), so the batches are identical to theirs. With ``mode="swap"`` each ``.x`` is a view
        of one ``(repeats * N, C, T, V, M)`` tensor.
        """
        draws = self.draw(x.shape, repeats, generator)
        return self.apply(x, {k: v.to(x.device) for k, v in draws.items()})

    def _check_shape(self, shape) -> None:
        if len(shape) != 5 or shape[3] != self.num_joints:
            raise ValueError(f"x must have shape (N, C, T, {self.num_joints}, M); got {tuple(shape)}")
        if shape[2] % self.block:
            raise ValueError(f"the sequence length T={shape[2]} must be a multiple of the encoder's temporal stride "
                             f"{self.block}, so the mixed region maps onto whole feature cells")

    def draw(self, shape, repeats: int, generator=None) -> dict[str, torch.Tensor]:
        """The random draws of :meth:`batches` for a batch of ``shape``, on the host, in the same order.

        ``mode="swap"``: ``partner (R, N)`` int64, ``joints (R, G, V)`` bool, ``span (R, G, 2)`` int64;
        otherwise ``mask (R, G, T // block, V)`` bool and, for ``"gaussian"``, ``fill (R, N, C, T, V, M)``.
        ``G`` is N with ``per_sample`` and 1 otherwise. All shapes depend on ``shape`` and ``repeats`` only.
        """
        self._check_shape(shape)
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1; got {repeats}")
        N, T = shape[0], shape[2]
        groups, blocks = (N if self.per_sample else 1), T // self.block
        if self.mode != "swap":
            masks, fills = [], []
            for _ in range(repeats):
                masks.append(self.sample_mask(groups, blocks, generator))
                if self.mode == "gaussian":
                    fills.append(torch.randn(tuple(shape), generator=generator))
            return {"mask": torch.stack(masks), **({"fill": torch.stack(fills)} if fills else {})}
        draws = []
        for _ in range(repeats):
            partner = self.sample_partner(N, generator)
            draws.append((partner, *self.sample_region(groups, blocks, generator)))
        partner, joints, span = (torch.stack(d) for d in zip(*draws))
        return {"partner": partner, "joints": joints, "span": span}

    def apply(self, x: torch.Tensor, draws: dict[str, torch.Tensor]) -> list[MixedBatch]:
        """The mixed batches of ``x`` from :meth:`draw`'s draws (on the device of ``x``).

        Never synchronises with the device, so CUDA graph capture can take it: the draws are valid by
        construction, so :func:`skelemix.ops.skelemix_gather` runs without its value checks (which would copy
        ``partner`` and ``span`` to the host).
        """
        self._check_shape(x.shape)
        N = x.shape[0]
        with torch.no_grad():
            if self.mode != "swap":
                masks = draws["mask"]
                region = reference.frame_region(masks, self.block, x.shape[2])  # (R, G, T, V)
                out = []
                for r in range(masks.shape[0]):
                    fill = torch.zeros_like(x) if self.mode == "zeros" else draws["fill"][r].to(x)
                    out.append(MixedBatch(torch.where(region[r][:, None, :, :, None], fill, x), masks[r], None))
                return out
            partner, joints, span = draws["partner"], draws["joints"], draws["span"]
            mixed, mask = ops.skelemix_gather(x, partner, joints, span, self.block, impl=self.impl,
                                               check_values=False)
        # A shared region has identical rows for every sample: keep one, as the (1, T', V) mask pooling expects.
        return [MixedBatch(mixed[r * N:(r + 1) * N], mask[r] if self.per_sample else mask[r, :1], partner[r])
                for r in range(partner.shape[0])]

