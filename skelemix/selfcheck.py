"""Self-checking ``impl="auto"``: a compiled kernel is used only after it has matched the eager reference here.

The first time ``impl="auto"`` would run a compiled implementation (``cuda``, ``triton``) of a fused op on a
CUDA device, :func:`trusted` runs a short parity probe (:func:`skelemix.parity.probe`): the implementation and
the eager reference on the same small random inputs, forward and backward, with the tolerances the tests use.
A probe is keyed by (op, implementation, dtype, device name, build, torch version):

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
used (the eager reference is). A model is probed by its first eager call; :func:`skelemix.ops.decide_auto` does it ahead, e.g.
before ``torch.compile`` or a capture.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import _extension
from .parity import OPS, PROBE_VERSION, Outcome, normal_device, probe  # noqa: F401 (OPS: the probed ops)

PROBED_DEVICE_TYPES = {"cuda"}  # devices whose compiled kernels auto probes before first use
CACHE_ENV = "SKELEMIX_CACHE_DIR"
REPORT = ("please report it with the output of `python -m skelemix.info --check`; impl='{impl}' still runs it "
          "when asked for explicitly")

_DECIDED: dict[tuple, bool] = {}  # (op, impl, dtype, device) -> usable, for this process


# ------------------------------------------------------------------------------------------ keys and cache


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


def trusted(op: str, impl: str, device: torch.device, dtype: torch.dtype | None, fn: Callable,
            auto_order: Sequence[str] = ()) -> bool:
    """Whether ``impl="auto"`` may run ``fn``, ``op``'s implementation ``impl``, on ``device`` in ``dtype``:
    always for the reference and for devices not in :data:`PROBED_DEVICE_TYPES`, else after a passing probe
    (cached on disk). Called by :func:`skelemix.ops._impl.select` on every auto call: the decided case is one
    dict lookup. ``auto_order``: what ``auto`` tries in turn on this device, named in the failure's warning."""
    if impl == "eager" or device.type not in PROBED_DEVICE_TYPES or dtype is None:
        return True
    decided = _DECIDED.get((op, impl, dtype, device))
    if decided is not None:
        return decided
    if not _probing_allowed(device):
        return False  # not recorded: the next eager call probes
    return _decide(op, impl, normal_device(device), dtype, fn, auto_order)


def _decide(op: str, impl: str, device: torch.device, dtype: torch.dtype, fn: Callable,
            auto_order: Sequence[str]) -> bool:
    key = _key(op, impl, device, dtype)
    if _cached_pass(key):
        ok = True
    else:
        outcome = probe(op, fn, device, dtype)
        ok = outcome.ok
        if ok:
            _remember_pass(key, outcome)
        else:
            order = ", then ".join(auto_order)
            warnings.warn(
                f"skelemix: the self-check of {op} impl={impl!r} ({key['dtype']} on {key['device']}) against the "
                f"eager reference failed: {outcome.error}; impl='auto' falls through to the next implementation "
                f"({order}) for it. This is a bug: {REPORT.format(impl=impl)}", RuntimeWarning, stacklevel=6)
    _DECIDED[(op, impl, dtype, device)] = ok
    return ok


# ------------------------------------------------------------------------------- python -m skelemix.info --check


def forget() -> None:
    """Drop this process's decisions (tests; the disk cache stays)."""
    _DECIDED.clear()
