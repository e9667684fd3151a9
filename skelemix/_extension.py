"""Loads the compiled ops (``skelemix._C``) and reports what was built and what can run here.

Importing never fails: a missing ``_C`` leaves ``HAS_CPP`` False (``impl="auto"`` then uses the eager
reference, and :func:`available` says how to build it); a broken or mismatched ``_C`` additionally warns once.
Set ``SKELEMIX_DISABLE_EXT=1`` to ignore ``_C`` altogether (as if it were not built).
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

REBUILD = "pip install --no-build-isolation -e ."

HAS_CPP = False  # the torch.ops.skelemix ops are loaded and built against this torch
HAS_CUDA_KERNELS = False  # ... and include the CUDA kernels
LOAD_ERROR: str | None = None  # why HAS_CPP is False
_BUILD: dict[str, str] = {}  # key=value lines of torch.ops.skelemix._build_info()


def _parse_build_info(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _load() -> None:
    global HAS_CPP, HAS_CUDA_KERNELS, LOAD_ERROR, _BUILD
    if os.environ.get("SKELEMIX_DISABLE_EXT") == "1":
        LOAD_ERROR = "skelemix._C is disabled by SKELEMIX_DISABLE_EXT=1; unset it to use the compiled ops"
        return
    try:
        importlib.import_module("skelemix._C")  # loading the .so registers torch.ops.skelemix.*
    except ModuleNotFoundError as exc:
        if exc.name != "skelemix._C":
            raise
        # Simply not built (e.g. an isolated `pip install`): reported by info and explicit impl requests.
        LOAD_ERROR = ("skelemix._C is not built (an isolated `pip install` cannot see torch, so it skips the ops); "
                      f"build them from the source checkout with: {REBUILD}")
        return
    except (ImportError, OSError) as exc:
        LOAD_ERROR = f"skelemix._C failed to load ({exc}); rebuild it against torch {torch.__version__}: {REBUILD}"
        warnings.warn(f"skelemix: {LOAD_ERROR}; falling back to the eager ops", RuntimeWarning, stacklevel=3)
        return
    try:
        _BUILD = _parse_build_info(torch.ops.skelemix._build_info())
    except (AttributeError, RuntimeError) as exc:
        LOAD_ERROR = f"skelemix._C has no usable _build_info op ({exc}); rebuild it: {REBUILD}"
    else:
        built = _BUILD.get("torch", "unknown")
        if built != torch.__version__:
            LOAD_ERROR = f"skelemix._C was built against torch {built}, running torch {torch.__version__}; rebuild: {REBUILD}"
    if LOAD_ERROR is not None:
        warnings.warn(f"skelemix: {LOAD_ERROR}; not using the compiled ops", RuntimeWarning, stacklevel=3)
        return
    HAS_CPP = True
    HAS_CUDA_KERNELS = _BUILD.get("cuda") == "1"


_load()


def triton_interpret() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton() -> tuple[bool, str, str]:
    """(importable, version, why not). Imported lazily: importing triton is slow."""
    try:
        import triton
    except Exception as exc:  # noqa: BLE001 - a broken triton install raises all sorts
        return False, "", f"triton is not importable ({type(exc).__name__}: {exc}); install it: pip install triton"
    return True, getattr(triton, "__version__", "unknown"), ""


def __getattr__(name: str):
    # HAS_TRITON is computed on first access, so that importing skelemix does not import triton.
    if name == "HAS_TRITON":
        return _triton()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available(name: str) -> tuple[bool, str]:
    """Whether implementation ``name`` (eager, cpp, cuda, triton) can run here; if not, what is missing and how
    to fix it."""
    if name == "eager":
        return True, ""
    if name == "cpp":
        return HAS_CPP, LOAD_ERROR or ""
    if name == "cuda":
        if not HAS_CPP:
            return False, LOAD_ERROR or ""
        if not HAS_CUDA_KERNELS:
            return False, ("skelemix._C was built without CUDA kernels; rebuild with nvcc and a CUDA build of torch: "
                           f"FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=<e.g. 9.0> {REBUILD}")
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible (torch.cuda.is_available() is False)"
        return True, ""
    if name == "triton":
        ok, _, why = _triton()
        if not ok:
            return False, why
        if not (torch.cuda.is_available() or triton_interpret()):
            return False, "triton needs a CUDA device, or TRITON_INTERPRET=1 to run in Triton's CPU interpreter"
        return True, ""
    raise ValueError(f"unknown implementation {name!r}; expected one of eager, cpp, cuda, triton")


def build_info() -> dict:
    """What was compiled and what is importable, for ``python -m skelemix.info`` and bug reports."""
    triton_ok, triton_version, triton_why = _triton()
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpp": HAS_CPP,
        "cuda_kernels": HAS_CUDA_KERNELS,
        "built_torch": _BUILD.get("torch"),
        "cuda_version": _BUILD.get("cuda_version"),
        "cuda_arch": _BUILD.get("cuda_arch"),
        "load_error": LOAD_ERROR,
        "triton": triton_ok,
        "triton_version": triton_version or None,
        "triton_error": triton_why or None,
        "triton_interpret": triton_interpret(),
    }
