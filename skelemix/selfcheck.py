"""Self-checking ``impl="auto"``: a compiled kernel is used only after it has matched the eager reference here.

The first time ``impl="auto"`` would run a compiled implementation (``cuda``, ``triton``) of a fused op on a
CUDA device, :func:`trusted` runs a short parity probe: the implementation and the eager reference on the same
small random inputs (shapes like the encoder's), forward and backward, compared with the tolerances the tests
use (:data:`skelemix.testing.TOLERANCES`, scaled by the largest expected value as in ``bench/gpu_parity.py``);
the dropout mask of ``bn_epilogue`` is compared bit for bit. A probe is keyed by (op, implementation, dtype,
device name, build, torch version):

- a pass is remembered for the process and cached on disk (:func:`cache_dir`), so later runs skip it; a cache
  that cannot be written costs only a repeated probe;
- a failure or a crash marks the implementation unusable for that key in this process and warns once (op,
  implementation, error, how to report it); ``auto`` then falls through to the next implementation (on CUDA:
  ``cuda``, ``triton``, ``eager``). Failures are not cached: a fixed build is probed again.

An explicit ``impl="cuda"`` or ``"triton"`` runs what was asked, without a probe. CPU kernels are not probed by
``auto`` (CI tests them on every build; ``python -m skelemix.info --check`` probes them on demand):
:data:`PROBED_DEVICE_TYPES` says which devices are, and tests add ``"cpu"`` to exercise the machinery on the C++
ops. A probe leaves every random number generator as it found it (torch CPU and CUDA, numpy, ``random``) and
never runs inside a ``torch.compile`` trace or a CUDA graph capture: there an undecided implementation is not
used (the eager reference is). A model is probed by its first eager call; :func:`prepare` does it ahead, e.g.
before ``torch.compile`` or a capture.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import math
import os
import platform
import random
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import _extension, reference, testing

PROBED_DEVICE_TYPES = {"cuda"}  # devices whose compiled kernels auto probes before first use
CACHE_ENV = "SKELEMIX_CACHE_DIR"
OPS = ("graph_conv", "mask_pool", "skelemix_gather", "bn_epilogue")
PROBE_VERSION = 1  # bump when the probe cases change: cached passes of older probes no longer count
REPORT = ("please report it with the output of `python -m skelemix.info --check`; impl='{impl}' still runs it "
          "when asked for explicitly")

_DECIDED: dict[tuple, bool] = {}  # (op, impl, dtype, device) -> usable, for this process


@dataclass
class Outcome:
    """What one probe found: ``ok``; ``max_error``, the largest absolute error seen relative to the largest
    expected value of its tensor; ``error`` (what failed) when not ok; how long it took."""

    ok: bool
    max_error: float = 0.0
    error: str = ""
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------- the probes


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
    """(max abs error / largest expected magnitude, "" or what is wrong). Floating results: within the dtype's (rtol, atol), the atol scaled
    by the largest expected value (sums that cancel are only meaningful at the operands' scale); copies (``exact``)
    and other dtypes: equal."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return math.inf, f"{name}: {actual.dtype} {list(actual.shape)}, expected {expected.dtype} {list(expected.shape)}"
    if exact or not expected.is_floating_point():
        if torch.equal(actual, expected):
            return 0.0, ""
        return math.inf, f"{name}: {int((actual != expected).sum())} of {expected.numel()} elements differ"
    if expected.numel() == 0:
        return 0.0, ""
    a, e = actual.detach().double(), expected.detach().double()
    rtol, atol = testing.tolerances(expected.dtype)
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
            pairs.append((f"{case} kept elements", got[0] != 0, reference.dropout_keep(args[6], args[0].shape, args[8])))
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
    device = _normal(device)
    start = time.perf_counter()
    with _rng_preserved(device), torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast(device.type, enabled=False):
        try:
            outcome = _run(op, fn, device, dtype)
        except Exception as err:  # noqa: BLE001 - a crashing kernel is what the probe is for
            outcome = Outcome(False, math.inf, f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")
    outcome.seconds = time.perf_counter() - start
    return outcome


# ------------------------------------------------------------------------------------------ keys and cache


def _normal(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"{device.type} {platform.machine()}"


@functools.lru_cache(maxsize=None)
def _file_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def build_id(impl: str, op: str) -> str:
    """What the kernels of ``impl`` were built from: the compiled library's contents, or the Triton sources of
    ``op`` and Triton's version, so that a rebuild or an edit is probed again."""
    if impl in ("cpp", "cuda"):
        return f"_C {_file_hash(importlib.import_module('skelemix._C').__file__)}"
    if impl == "triton":  # the op's registration, its kernels and their shared launcher
        sources = [importlib.import_module(name).__file__
                   for name in (f"skelemix.ops.{op}", f"skelemix.kernels.{op}", "skelemix.kernels._launch")]
        return f"triton {_extension._triton()[1]} " + " ".join(_file_hash(p) for p in sources)
    return impl


def cache_dir() -> Path:
    """Where passing probes are remembered: ``$SKELEMIX_CACHE_DIR``, else ``$XDG_CACHE_HOME/skelemix``, else
    ``~/.cache/skelemix``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "skelemix"


def _key(op: str, impl: str, device: torch.device, dtype: torch.dtype) -> dict:
    import skelemix

    return {"op": op, "impl": impl, "dtype": str(dtype).replace("torch.", ""), "device": device_name(device),
            "build": build_id(impl, op), "torch": torch.__version__, "skelemix": skelemix.__version__,
            "probe": PROBE_VERSION}


def _cache_file(key: dict) -> Path:
    # Named by a hash: nothing from the key (a device name, say) ever becomes part of a path.
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / "selfcheck" / f"{digest}.json"


def _cached_pass(key: dict) -> bool:
    try:
        return json.loads(_cache_file(key).read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


def _remember_pass(key: dict, outcome: Outcome) -> None:
    path = _cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump({"key": key, "max_error": outcome.max_error, "seconds": round(outcome.seconds, 4),
                       "date": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
        os.replace(f.name, path)  # atomic: processes probing at once (one per GPU) never read half a file
    except OSError:
        with contextlib.suppress(OSError, NameError):
            os.unlink(f.name)


# ------------------------------------------------------------------------------------------ what auto uses


def _probing_allowed(device: torch.device) -> bool:
    """False inside a torch.compile trace, a CUDA graph capture or a tracing dispatch mode (fake tensors): a
    probe there would be traced or captured instead of run."""
    if torch.compiler.is_compiling():
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is None


def trusted(op: str, impl: str, device: torch.device, dtype: torch.dtype | None, fn: Callable) -> bool:
    """Whether ``impl="auto"`` may run ``fn``, ``op``'s implementation ``impl``, on ``device`` in ``dtype``:
    always for the reference and for devices not in :data:`PROBED_DEVICE_TYPES`, else after a passing probe
    (cached on disk). Called by :func:`skelemix.ops._impl.select` on every auto call: the decided case is one
    dict lookup."""
    if impl == "eager" or device.type not in PROBED_DEVICE_TYPES or dtype is None:
        return True
    decided = _DECIDED.get((op, impl, dtype, device))
    if decided is not None:
        return decided
    if not _probing_allowed(device):
        return False  # not recorded: the next eager call probes
    return _decide(op, impl, _normal(device), dtype, fn)


def _decide(op: str, impl: str, device: torch.device, dtype: torch.dtype, fn: Callable) -> bool:
    key = _key(op, impl, device, dtype)
    if _cached_pass(key):
        ok = True
    else:
        outcome = probe(op, fn, device, dtype)
        ok = outcome.ok
        if ok:
            _remember_pass(key, outcome)
        else:
            from .ops._impl import _AUTO_ORDER

            order = ", then ".join(_AUTO_ORDER[device.type])
            warnings.warn(
                f"skelemix: the self-check of {op} impl={impl!r} ({key['dtype']} on {key['device']}) against the "
                f"eager reference failed: {outcome.error}; impl='auto' falls through to the next implementation "
                f"({order}) for it. This is a bug: {REPORT.format(impl=impl)}", RuntimeWarning, stacklevel=6)
    _DECIDED[(op, impl, dtype, device)] = ok
    return ok


def prepare(device, dtypes=(torch.float32,), ops=OPS) -> dict[tuple[str, torch.dtype], str]:
    """Decide now what ``impl="auto"`` runs for each op and dtype on ``device`` (probing where needed), e.g.
    before ``torch.compile`` or a CUDA graph capture. Returns ``{(op, dtype): implementation}``."""
    from .ops._impl import choose

    device = _normal(device)
    return {(op, dtype): choose(op, "auto", device, importlib.import_module(f"skelemix.ops.{op}")._IMPLEMENTATIONS,
                                dtype)
            for op in ops for dtype in dtypes}


# ------------------------------------------------------------------------------- python -m skelemix.info --check


DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
IMPLS_ON = {"cpu": ("eager", "cpp", "triton"), "cuda": ("eager", "cuda", "triton")}  # what runs on each device


@dataclass
class Row:
    """One (op, implementation) of :func:`check_op`: a cell per dtype (an :class:`Outcome`, or a string:
    ``"reference"``, ``"unavailable"``, ``"unsupported"``), and why it is unavailable."""

    op: str
    impl: str
    cells: dict
    why: str = ""


def check_op(op: str, device, dtypes=DTYPES) -> tuple[list[Row], dict[torch.dtype, str]]:
    """Probe every implementation of ``op`` that can run on ``device`` (no cache), for ``python -m skelemix.info
    --check``. Returns its rows and what ``impl="auto"`` picks per dtype given them: on a probed device the
    first implementation that passed, elsewhere the first available (auto trusts it)."""
    from .ops._impl import _AUTO_UNSUPPORTED, _usable, auto_candidates

    device = _normal(device)
    implementations = importlib.import_module(f"skelemix.ops.{op}")._IMPLEMENTATIONS
    rows, passed = [], set()
    for impl in IMPLS_ON[device.type]:
        if impl not in implementations:
            continue
        if impl == "eager":
            rows.append(Row(op, impl, {dtype: "reference" for dtype in dtypes}))
        elif not _usable(impl, device):
            rows.append(Row(op, impl, {dtype: "unavailable" for dtype in dtypes}, _extension.available(impl)[1]
                            or f"triton runs on CUDA tensors (or on {device.type} ones under TRITON_INTERPRET=1)"))
        else:
            cells = {}
            for dtype in dtypes:
                if dtype in _AUTO_UNSUPPORTED.get(impl, ()):
                    cells[dtype] = "unsupported"
                    continue
                cells[dtype] = probe(op, implementations[impl], device, dtype)
                if cells[dtype].ok:
                    passed.add((impl, dtype))
            rows.append(Row(op, impl, cells))
    picks = {}
    for dtype in dtypes:
        candidates = auto_candidates(device, implementations, dtype)
        if device.type in PROBED_DEVICE_TYPES:
            candidates = [name for name in candidates if name == "eager" or (name, dtype) in passed]
        picks[dtype] = candidates[0]
    return rows, picks


def forget() -> None:
    """Drop this process's decisions (tests; the disk cache stays)."""
    _DECIDED.clear()
