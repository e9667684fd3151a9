"""Eager PyTorch references of the fused ops: the oracle every kernel is tested against.

Each function here is plain, differentiable PyTorch with the exact semantics of docs/DESIGN.md. The C++,
CUDA and Triton implementations in :mod:`skelemix.ops` must match them; tests and benchmarks import them
from here and nowhere else.
"""
from __future__ import annotations

import torch


def mask_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spatio-temporal mask pooling (docs/DESIGN.md 2.2 item 5).

    Args:
        x: ``(B, C, T, V)`` floating feature map (``B`` = samples x bodies).
        mask: ``(G, T, V)`` bool with ``B % G == 0``. Row ``b`` of ``x`` uses ``mask[b // (B // G)]``, so
            ``G == 1`` shares one mask across the batch and ``G == N`` gives each sample (both of its
            bodies) its own mask.

    Returns:
        ``(B, 2, C)`` in the dtype of ``x``: ``[:, 0]`` is the mean of ``x`` over the True cells ("p", the
        trimmed view), ``[:, 1]`` the mean over the False cells ("c", the truncated view). The divisor is
        the number of cells of that region in ``(T, V)``; an empty region pools to 0 (the official code
        divides by zero there). Global average pooling is ``[:, 0]`` with an all-True mask.
    """
    B, C, T, V = x.shape
    G = mask.shape[0]
    m = mask.to(x.dtype).repeat_interleave(B // G, dim=0).reshape(B, 1, T * V)
    flat = x.reshape(B, C, T * V)
    inside = m.sum(-1).clamp_min(1)
    outside = (1 - m).sum(-1).clamp_min(1)
    p = (flat * m).sum(-1) / inside
    c = (flat * (1 - m)).sum(-1) / outside
    return torch.stack((p, c), dim=1)


def graph_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor) -> torch.Tensor:
    """The ST-GCN spatial graph convolution (docs/DESIGN.md 2.2, "gcn").

    Args:
        x: ``(N, C_in, T, V)``.
        weight: ``(K * C_out, C_in)``, the 1x1 convolution; ``bias``: ``(K * C_out,)`` or None.
        A: ``(K, V, V)`` effective adjacency (graph times edge importance).

    Returns:
        ``(N, C_out, T, V)`` with ``out[n, c, t, w] = sum_k sum_v h[n, k, c, t, v] * A[k, v, w]`` where
        ``h = conv1x1(x)`` viewed as ``(N, K, C_out, T, V)``. The bias is propagated through ``A``.
    """
    K = A.shape[0]
    h = torch.einsum("oi,nitv->notv", weight, x)
    if bias is not None:
        h = h + bias.view(1, -1, 1, 1)
    N, KC, T, V = h.shape
    return torch.einsum("nkctv,kvw->nctw", h.view(N, K, KC // K, T, V), A)


def block_region(joints: torch.Tensor, span: torch.Tensor, blocks: int) -> torch.Tensor:
    """The SkeleMix region at block (feature) resolution: ``(..., G, blocks, V)`` bool from ``joints (..., G, V)``
    and ``span (..., G, 2)`` ``[start, end)`` in blocks; block ``b`` of joint ``v`` is in the region when
    ``joints[..., v]`` and ``start <= b < end``. Every implementation takes its region from here."""
    b = torch.arange(blocks, device=span.device)
    in_span = (b >= span[..., :1]) & (b < span[..., 1:])  # (..., G, blocks)
    return in_span[..., None] & joints[..., None, :]


def frame_region(region: torch.Tensor, block: int, frames: int) -> torch.Tensor:
    """A block-resolution region ``(..., blocks, V)`` at frame resolution ``(..., frames, V)``: frame ``t`` lies in
    block ``t // block`` (the last block may be partial). ``repeat_interleave`` as a view expansion, so that it
    never synchronises with the device (CUDA graph capture)."""
    *lead, blocks, V = region.shape
    return region.unsqueeze(-2).expand(*lead, blocks, block, V).reshape(*lead, blocks * block, V)[..., :frames, :]


def skelemix_gather(x: torch.Tensor, partner: torch.Tensor, joints: torch.Tensor, span: torch.Tensor,
                    block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SkeleMix 'swap' mixing of ``R`` batches at once (docs/DESIGN.md 3 items 4-6).

    Args:
        x: ``(N, C, T, V, M)`` batch of sequences (any dtype; the op is a copy). ``T`` need not be a multiple
            of ``block``: the last block is then partial.
        partner: ``(R, N)`` int64 in ``[0, N)``; mix ``r`` pastes a fragment of ``x[partner[r, n]]`` into ``x[n]``.
        joints: ``(R, G, V)`` bool, ``G`` in ``{1, N}``: the pasted joints of mix ``r``, shared by the batch
            (``G == 1``, the official case) or per sample (``G == N``, sample ``n`` uses group ``n``).
        span: ``(R, G, 2)`` int64 ``[start, end)`` in blocks, ``0 <= start <= end <= ceil(T / block)``.
        block: frames per block (the encoder's temporal stride); frame ``t`` lies in block ``t // block``.

    Returns:
        ``mixed``: ``(R * N, C, T, V, M)``; ``mixed[r * N + n, :, t, v]`` is ``x[partner[r, n], :, t, v]`` when
        ``joints[r, g, v]`` and ``start <= t // block < end`` (all channels, all bodies), else ``x[n, :, t, v]``.
        ``mask``: ``(R, N, ceil(T / block), V)`` bool, the region at block (feature) resolution: True =
        pasted (the "trimmed" view).

    Device-side indexing only: on CUDA it never synchronises with the host (and it reads out of bounds for an
    invalid ``partner``, which :func:`skelemix.ops.skelemix_gather` checks).
    """
    N, _, T, V, _ = x.shape
    R = partner.shape[0]
    mask = block_region(joints, span, -(-T // block)).expand(R, N, -1, V).contiguous()
    region = frame_region(mask, block, T)  # (R, N, T, V)
    mixed = torch.where(region[:, :, None, :, :, None], x[partner], x[None])
    return mixed.reshape(R * N, *x.shape[1:]), mask


_U32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Philox4x32 round multipliers
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # Philox4x32 key increments (golden ratio, sqrt(3) - 1)


def _mulhilo32(m: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m * b) >> 32`` and ``(m * b) mod 2**32`` for a constant ``m < 2**32`` and ``b`` in ``[0, 2**32)`` held
    in int64: ``b`` is split into 16-bit halves so no product exceeds 2**48."""
    t = m * (b & 0xFFFF)
    u = m * (b >> 16)  # m * b = u * 2**16 + t
    return (u + (t >> 16)) >> 16, (((u & 0xFFFF) << 16) + t) & _U32


def philox4x32(counter, key, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox4x32-``rounds`` (Salmon et al., SC 2011; Random123) on int64-held uint32 words.

    Args:
        counter: four int64 tensors (broadcastable) with values in ``[0, 2**32)``.
        key: two int64 tensors or ints in ``[0, 2**32)``.

    Returns:
        The four output words, int64 in ``[0, 2**32)``.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _U32, (k1 + _PHILOX_W[1]) & _U32
    return c0, c1, c2, c3


def dropout_bits(seed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The 32 random bits of element ``index`` (int64, ``>= 0``) under ``seed`` (int64, one element): word 0 of
    Philox4x32-10 with key ``(seed mod 2**32, seed >> 32 mod 2**32)`` and counter ``(index mod 2**32,
    index >> 32, 0, 0)``, which is Triton's ``tl.randint(seed, index)``. int64 in ``[0, 2**32)``."""
    seed = seed.reshape(()).to(torch.int64)
    key = (seed & _U32, (seed >> 32) & _U32)
    zero = torch.zeros((), dtype=torch.int64, device=index.device)
    flat = index.reshape(-1)
    out = torch.empty_like(flat)
    # On the CPU in cache-sized pieces: the 260 elementwise ops then run 5x faster than over a large tensor.
    chunk = 1 << 16 if flat.device.type == "cpu" else max(flat.numel(), 1)
    for start in range(0, flat.numel(), chunk):
        i = flat[start:start + chunk]
        out[start:start + chunk] = philox4x32((i & _U32, i >> 32, zero, zero), key)[0]
    return out.reshape(index.shape)


# The MurmurHash-finaliser mask that Philox replaced, fmix32(fmix32(lo(i) ^ lo(seed)) ^ (hi(i) + hi(seed))), only
# relabelled indices: seed ^ d gave the mask of seed with element i moved to i ^ d, and seed + 2**32 that mask
# shifted by 2**32 elements (tests/test_bn_epilogue.py::test_related_seeds_give_unrelated_masks). draw_seed's random
# 62-bit seeds never form such pairs, and every other statistic measured on its masks (keep rate, per-row counts,
# correlations between neighbours, samples, channels, seeds and consecutive calls at all shifts and XOR-shifts,
# Walsh spectra) was that of independent bits, so nothing found in the masks explains the worse demo runs.


def dropout_threshold(p: float) -> int:
    """An element is kept when its 32 random bits are ``>= dropout_threshold(p)`` (``P(keep) = 1 - p``). An
    integer compare rather than ``tl.rand(...) >= p``, whose float conversion keeps 31 bits and rounds: every
    implementation then agrees exactly."""
    return min(int(p * 4294967296.0), _U32)


def dropout_keep(seed: torch.Tensor, shape, p: float, offset: int = 0) -> torch.Tensor:
    """The counter-based dropout mask of :func:`bn_epilogue`: bool, ``shape``, True = kept.

    Element ``i`` (flat row-major index) is kept iff ``dropout_bits(seed, offset + i) >= dropout_threshold(p)``.
    Every kernel regenerates the mask from ``(seed, i)`` instead of storing it, so the backward needs no mask
    tensor. ``offset`` (0 in :func:`bn_epilogue`) lets tests reach counters beyond 2**32 with small shapes.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    index = torch.arange(offset, offset + numel, device=seed.device, dtype=torch.int64)
    return (dropout_bits(seed, index) >= dropout_threshold(p)).reshape(shape)


def bn_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None,
                stats_mean: torch.Tensor | None, stats_var: torch.Tensor | None, seed: torch.Tensor, eps: float,
                p: float, relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm, dropout, residual add and ReLU after a convolution, in one op (docs/DESIGN.md 2.2, "tcn").

    ``y = relu(dropout_p(batch_norm(x)) + residual)``, each stage optional, with the arithmetic done in the
    accumulation dtype ``acc`` (float64 for float64 ``x``, else float32) and one rounding to ``x.dtype``:

    - ``a = weight * rsqrt(var + eps)``, ``pre = (x - mean) * a + bias`` per channel (dim 1);
    - with ``p > 0``: ``pre * keep * (1 / (1 - p))``, ``keep = dropout_keep(seed, x.shape, p)``;
    - ``+ residual``; ``relu`` clamps at 0.

    Args:
        x: ``(N, C, *)`` floating (float32, float64, float16 or bfloat16).
        weight, bias: ``(C,)`` in ``acc``.
        residual: ``x``'s shape and dtype, or None.
        stats_mean, stats_var: ``(C,)`` in ``acc``, fixed statistics (evaluation mode; not differentiated);
            both None: the batch statistics of ``x`` over every dim but 1 (training mode), through which the
            gradient flows as in ``nn.BatchNorm``.
        seed: int64 tensor of one element on ``x``'s device (read only when ``p > 0``).
        eps: added to the variance. p: dropout probability in ``[0, 1)``. relu: apply the ReLU.

    Returns:
        ``(y, mean, var)``: ``y`` in ``x``'s dtype; in training mode the batch mean and biased variance
        (``acc``, for the running statistics; not differentiable), else two empty ``(0,)`` tensors.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if stats_mean is None:
        var, mean = torch.var_mean(xf, dim=[0, *range(2, x.dim())], correction=0)
    else:
        mean, var = stats_mean.detach(), stats_var.detach()
    a = weight * torch.rsqrt(var + eps)
    out = (xf - mean.view(shape)) * a.view(shape) + bias.view(shape)
    if p > 0:
        out = out * (dropout_keep(seed, x.shape, p).to(acc) * (1.0 / (1.0 - p)))
    if residual is not None:
        out = out + residual.to(acc)
    if relu:
        out = torch.relu(out)
    if stats_mean is not None:
        mean = var = xf.new_empty((0,))
    return out.to(x.dtype), mean.detach(), var.detach()
