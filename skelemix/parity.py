"""The parity probe: one implementation of a fused op against its eager reference, here and now.

:func:`probe` runs an implementation and :mod:`skelemix.reference` on the same small random inputs (shapes like
the encoder's), forward and backward, and compares them with the tolerances the tests use
(:func:`tolerances`, the atol scaled by the largest expected value as in ``bench/gpu_parity.py``);
the dropout mask of ``bn_epilogue`` is compared bit for bit. It leaves every random number generator as it found
it and reports a crash as a failed :class:`Outcome`. :mod:`skelemix.selfcheck` decides with it what
``impl="auto"`` may run, and ``python -m skelemix.info --check`` prints its findings.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import reference

OPS = ("graph_conv", "mask_pool", "skelemix_gather", "bn_epilogue")

# (rtol, atol) for comparing an implementation with the eager reference run in the same dtype. fp64 and fp32
# leave room only for a different summation order. fp16/bf16 allow about two roundings of the result (the
# reference rounds the sum and the mean separately; the kernels accumulate in fp32 and round once).
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (5e-3, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for ``dtype``; see :data:`TOLERANCES`."""
    return TOLERANCES[dtype]


PROBE_VERSION = 1  # bump when the cases below change: cached passes of older probes no longer count


def normal_device(device) -> torch.device:
    """``device`` as a :class:`torch.device` with its index: plain ``"cuda"`` is the current CUDA device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class Outcome:
    """What one probe found: ``ok``; ``max_error``, the largest absolute error seen relative to the largest
    expected value of its tensor; ``error`` (what failed) when not ok; how long it took."""

    ok: bool
    max_error: float = 0.0
    error: str = ""
    seconds: float = 0.0


def _cases(op: str, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> list[tuple[str, tuple]]:
    """Small inputs shaped like the encoder's (V = 25, K = 3), drawn from ``gen`` on the CPU, then moved."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def t(*shape, kind="randn", dt=dtype):
        v = torch.randn(*shape, generator=gen) if kind == "randn" else torch.rand(*shape, generator=gen)
        return v.to(device=device, dtype=dt)

    def seed():
        return torch.randint(0, 2**62, (1,), generator=gen).to(device)

    if op == "graph_conv":  # both contraction orders (C_in <= C_out, the weight first), and a partial channel tile
        return [(name, (t(2, cin, frames, 25), t(3 * cout, cin) * 0.3, t(3 * cout), t(3, 25, 25, kind="rand") / 8))
                for name, cin, cout, frames in (("16->16", 16, 16, 8), ("48->16", 48, 16, 4), ("16->80", 16, 80, 2))]
    if op == "mask_pool":  # post-ReLU features; the second mask is mostly inside
        x = t(4, 32, 4, 25).relu()
        mask = torch.rand(2, 4, 25, generator=gen).to(device) < torch.tensor([[[0.5]], [[0.95]]]).to(device)
        return [("relu features", (x, mask))]
    if op == "skelemix_gather":
        cases = []
        for name, groups in (("shared region", 1), ("per-sample regions", 4)):
            start = torch.randint(0, 3, (3, groups), generator=gen)
            span = torch.stack((start, start + torch.randint(0, 3, (3, groups), generator=gen)), -1)
            cases.append((name, (t(4, 3, 16, 25, 2), torch.randint(0, 4, (3, 4), generator=gen).to(device),
                                 (torch.rand(3, groups, 25, generator=gen) < 0.5).to(device), span.to(device), 4,
                                 False)))  # unchecked, as SkeleMix calls it (valid values)
        return cases
    if op == "bn_epilogue":
        C = 16
        # The last case has no ReLU and no residual, so the op's dropout mask is where its output is non-zero.
        return [
            ("train: dropout, residual, ReLU", (t(4, C, 8, 25), t(C, kind="rand", dt=acc) + 0.5, t(C, dt=acc),
                                                 t(4, C, 8, 25), None, None, seed(), 1e-5, 0.5, True)),
            ("eval: fixed statistics", (t(4, C, 8, 25), t(C, kind="rand", dt=acc) + 0.5, t(C, dt=acc), None,
                                        t(C, dt=acc), t(C, kind="rand", dt=acc) + 0.5, seed(), 1e-5, 0.0, False)),
            ("dropout mask", (t(2, C, 8, 25), t(C, kind="rand", dt=acc) + 0.5, t(C, dt=acc), None, None, None,
                              seed(), 1e-5, 0.5, False)),
        ]
    raise ValueError(f"no self-check probe for op {op!r}; expected one of {', '.join(OPS)}")


def _reference(op: str) -> Callable:
    if op == "skelemix_gather":
        return lambda x, partner, joints, span, block, check_values: reference.skelemix_gather(
            x, partner, joints, span, block)
    return getattr(reference, op)


def _outputs(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _compare(name: str, actual: torch.Tensor, expected: torch.Tensor, exact: bool = False) -> tuple[float, str]:
    """(max abs error / largest expected magnitude, "" or what is wrong). Floating results: within the dtype's
    (rtol, atol), the atol scaled by the largest expected value (sums that cancel are only meaningful at the
    operands' scale); copies (``exact``) and other dtypes: equal."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return math.inf, (f"{name}: {actual.dtype} {list(actual.shape)}, expected {expected.dtype} "
                          f"{list(expected.shape)}")
    if exact or not expected.is_floating_point():
        if torch.equal(actual, expected):
            return 0.0, ""
        return math.inf, f"{name}: {int((actual != expected).sum())} of {expected.numel()} elements differ"
    if expected.numel() == 0:
        return 0.0, ""
    a, e = actual.detach().double(), expected.detach().double()
    rtol, atol = tolerances(expected.dtype)
    diff = (a - e).abs().nan_to_num(math.inf)
    scale = float(e.abs().max())
    err = float(diff.max()) / max(scale, 1e-30)
    if bool((diff > atol + rtol * scale + rtol * e.abs()).any()):
        return err, f"{name}: max error {err:.3g} of the largest value {scale:.3g} (rtol {rtol}, atol {atol} scaled)"
    return err, ""


def _run(op: str, fn: Callable, device: torch.device, dtype: torch.dtype) -> Outcome:
    """The probe itself (RNG and grad mode handled by :func:`probe`)."""
    gen = torch.Generator().manual_seed(20261218)
    ref = _reference(op)
    worst = 0.0
    for case, args in _cases(op, device, dtype, gen):
        mine = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                and op != "skelemix_gather" else a for a in args]
        theirs = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                  for a in mine]
        got, want = _outputs(fn(*mine)), _outputs(ref(*theirs))
        pairs = [(f"{case} output {i}", g, w) for i, (g, w) in enumerate(zip(got, want))]
        differentiable = [(g, w) for g, w in zip(got, want) if w.requires_grad and w.numel()]
        if differentiable:
            cotangents = [torch.randn(w.shape, generator=gen).to(device=device, dtype=w.dtype)
                          for _, w in differentiable]
            leaves = [(i, a, b) for i, (a, b) in enumerate(zip(mine, theirs))
                      if isinstance(a, torch.Tensor) and a.requires_grad]
            g_got = torch.autograd.grad([g for g, _ in differentiable], [a for _, a, _ in leaves], cotangents,
                                        allow_unused=True)
            g_want = torch.autograd.grad([w for _, w in differentiable], [b for _, _, b in leaves], cotangents,
                                         allow_unused=True)
            for (i, a, _), g, w in zip(leaves, g_got, g_want):
                if w is not None:
                    pairs.append((f"{case} grad of input {i}", torch.zeros_like(a) if g is None else g, w))
        if case == "dropout mask":  # bit for bit: the kept elements are the reference's
            keep = reference.dropout_keep(args[6], args[0].shape, args[8])
            pairs.append((f"{case} kept elements", got[0] != 0, keep))
        for name, g, w in pairs:
            err, wrong = _compare(name, g, w, exact=op == "skelemix_gather")
            worst = max(worst, err)
            if wrong:
                return Outcome(False, worst, wrong)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a kernel's asynchronous error surfaces here, inside the probe
    return Outcome(True, worst)


@contextlib.contextmanager
def _rng_preserved(device: torch.device):
    """Every generator a probe could touch, given back as found (a probe must not shift a training's draws)."""
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


def probe(op: str, fn: Callable, device, dtype: torch.dtype) -> Outcome:
    """Run the parity probe of ``op``'s implementation ``fn`` on ``device`` in ``dtype`` (no cache). Never raises
    for what the implementation does: a crash is a failed :class:`Outcome`."""
    device = normal_device(device)
    start = time.perf_counter()
    with _rng_preserved(device), torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast(device.type, enabled=False):
        try:
            outcome = _run(op, fn, device, dtype)
        except Exception as err:  # noqa: BLE001 - a crashing kernel is what the probe is for
            outcome = Outcome(False, math.inf, f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")
    outcome.seconds = time.perf_counter() - start
    return outcome

