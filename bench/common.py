"""What every benchmark shares: the device, the providers, the sizes, and the timed measurement.

Environment knobs (so that ``bench/device_check.sh`` and users need no extra pytest options):
``SKELEMIX_BENCH_SIZE`` = ``cpu`` | ``paper`` (default: ``paper`` on a GPU, ``cpu`` otherwise),
``SKELEMIX_BENCH_ROUNDS`` (timed rounds per case, default 10 on a GPU and 3 on the CPU),
``SKELEMIX_BENCH_JSON`` (where the results go, default ``.benchmarks/skelemix-latest.json``),
``SKELEMIX_BENCH_COMPILE=0`` (skip the torch.compile provider: its cold compile takes minutes on a CPU).
"""
from __future__ import annotations

import importlib
import json
import os
import platform
from pathlib import Path
from typing import Callable

import pytest
import torch

from skelemix import _extension
from skelemix.ops import _impl

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZE = os.environ.get("SKELEMIX_BENCH_SIZE", "paper" if DEVICE.type == "cuda" else "cpu")
if SIZE not in ("cpu", "paper"):
    raise ValueError(f"SKELEMIX_BENCH_SIZE must be 'cpu' or 'paper'; got {SIZE!r}")
ROUNDS = int(os.environ.get("SKELEMIX_BENCH_ROUNDS", 10 if DEVICE.type == "cuda" else 3))
WARMUP = 2  # untimed calls first: torch.compile, Triton autotuning and allocator warm-up stay out of the timing
# Batch (samples; each has 2 bodies) of the paper's config and of the CPU-sized variant.
BATCH = {"paper": 128, "cpu": 16}[SIZE]

# eager = the reference; compile = torch.compile of the reference; the rest are skelemix.ops impls.
PROVIDERS = ("eager", "compile", "cpp", "cuda", "triton")
RESULTS: list[dict] = []


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def environment() -> dict:
    triton_ok, triton_version, _ = _extension._triton()
    return {"device": device_name(), "device_type": DEVICE.type, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton_version if triton_ok else None,
            "python": platform.python_version(), "size": SIZE, "rounds": ROUNDS}


def skip_unless_provider(provider: str, op: str | None = None) -> None:
    """Skip the current benchmark when ``provider`` cannot run here (or the fused op ``op`` has no such impl)."""
    if provider == "compile":
        if os.environ.get("SKELEMIX_BENCH_COMPILE", "1") == "0":
            pytest.skip("SKELEMIX_BENCH_COMPILE=0")
        return
    if provider == "eager":
        return
    if provider == "triton" and DEVICE.type != "cuda":
        pytest.skip("Triton benchmarks need a GPU (the CPU interpreter is for correctness only)")
    if provider in ("cpp", "cuda") and DEVICE.type != _impl._DEVICE_OF_IMPL[provider]:
        pytest.skip(f"impl={provider} runs on {_impl._DEVICE_OF_IMPL[provider]}; this run is on {DEVICE.type}")
    ok, why = _extension.available(provider)
    if not ok:
        pytest.skip(f"impl={provider} unavailable: {why}")
    if op is None:  # a whole model: every fused op must have this impl
        from skelemix import ops

        try:
            ops.check_impl_available(provider, DEVICE)
        except RuntimeError as err:
            pytest.skip(str(err))
        return
    # The module, not the function of the same name that skelemix.ops exports.
    if provider not in importlib.import_module(f"skelemix.ops.{op}")._IMPLEMENTATIONS:
        pytest.skip(f"{op} has no impl={provider}")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def json_path() -> Path:
    return Path(os.environ.get("SKELEMIX_BENCH_JSON", ".benchmarks/skelemix-latest.json"))


def save_results() -> Path:
    """Write everything measured so far (after every case, so a run cut short still leaves its results)."""
    path = json_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"environment": environment(), "results": RESULTS}, indent=1))
    tmp.replace(path)
    return path


def measure(benchmark, fn: Callable[[], object], *, group: str, provider: str, shapes: dict,
            dtype: torch.dtype = torch.float32, bytes: float = 0.0, flops: float = 0.0,
            rounds: int | None = None, warmup: int = WARMUP) -> float:
    """Time ``fn`` (device synchronised inside the timed call) and record the result; returns the median (s).

    ``bytes``/``flops``: the minimum traffic and arithmetic of one call, for GB/s and TFLOP/s.
    """
    def timed():
        fn()
        sync()

    for _ in range(warmup):
        timed()
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, shapes=shapes, dtype=str(dtype).replace("torch.", ""),
                                bytes=bytes, flops=flops, **environment())
    benchmark.pedantic(timed, rounds=rounds or ROUNDS, iterations=1)
    median = benchmark.stats.stats.median
    RESULTS.append({"group": group, "provider": provider, "median_s": median,
                    "min_s": benchmark.stats.stats.min, "shapes": shapes,
                    "dtype": str(dtype).replace("torch.", ""), "bytes": bytes, "flops": flops})
    save_results()
    return median


def numbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
