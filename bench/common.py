"""What every benchmark shares: the device, the providers, the sizes, and the timed measurement.

Environment knobs (so that ``bench/device_check.sh`` and users need no extra pytest options):
``SKELEMIX_BENCH_SIZE`` = ``cpu`` | ``paper`` | ``tiny`` (default: ``paper`` on a GPU, ``cpu`` otherwise; ``tiny``
is the dry run of ``bench/device_check.sh``: a batch of 4 through a narrow model (:data:`MODEL_OVERRIDES`), one
round),
``SKELEMIX_BENCH_ROUNDS`` (timed rounds per case, default 10 on a GPU and 3 on the CPU),
``SKELEMIX_BENCH_JSON`` (where the results go, default ``.benchmarks/skelemix-latest.json``; the step matrix
also goes, as a table rewritten after every row, to ``steps.md`` beside it),
``SKELEMIX_BENCH_APPEND=1`` (keep the results already in that file: several pytest runs into one report),
``SKELEMIX_BENCH_COMPILE=0`` (skip the torch.compile provider: its cold compile takes minutes on a CPU),
``SKELEMIX_BENCH_COMPILE_BACKEND`` (the torch.compile backend, default ``inductor``; the dry run uses ``eager``).
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
if SIZE not in ("cpu", "paper", "tiny"):
    raise ValueError(f"SKELEMIX_BENCH_SIZE must be 'cpu', 'paper' or 'tiny'; got {SIZE!r}")
ROUNDS = int(os.environ.get("SKELEMIX_BENCH_ROUNDS", 1 if SIZE == "tiny" else 10 if DEVICE.type == "cuda" else 3))
# Untimed calls first: torch.compile, Triton autotuning and allocator warm-up stay out of the timing.
WARMUP = 1 if SIZE == "tiny" else 2
# Batch (samples; each has 2 bodies) of the paper's config, of the CPU-sized variant and of the dry run.
BATCH = {"paper": 128, "cpu": 16, "tiny": 4}[SIZE]
# Config overrides of the model benchmarks: the paper's widths, except in the dry run (it checks the code path).
MODEL_OVERRIDES = [f"train.batch_size={BATCH}"] + (["model.hidden_channels=4", "model.hidden_dim=16",
                                                     "model.feature_dim=8", "model.queue_size=64"] if SIZE == "tiny" else [])
COMPILE_BACKEND = os.environ.get("SKELEMIX_BENCH_COMPILE_BACKEND", "inductor")

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
    if provider in ("eager", "official-style"):
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


def _earlier_results() -> list[dict]:
    """With SKELEMIX_BENCH_APPEND=1, what earlier pytest runs saved to the same file."""
    if os.environ.get("SKELEMIX_BENCH_APPEND") != "1" or not json_path().is_file():
        return []
    try:
        return json.loads(json_path().read_text())["results"]
    except (ValueError, KeyError):
        return []


EARLIER = _earlier_results()


def payload() -> dict:
    return {"environment": environment(), "results": EARLIER + RESULTS}


def save_results() -> Path:
    """Write everything measured so far (after every case, so a run cut short still leaves its results)."""
    path = json_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload(), indent=1))
    tmp.replace(path)
    return path


def measure(benchmark, fn: Callable[[], object], *, group: str, provider: str, shapes: dict,
            dtype: torch.dtype = torch.float32, bytes: float = 0.0, flops: float = 0.0,
            rounds: int | None = None, warmup: int = WARMUP, extra: dict | None = None) -> float:
    """Time ``fn`` (device synchronised inside the timed call) and record the result; returns the median (s).

    ``bytes``/``flops``: the minimum traffic and arithmetic of one call, for GB/s and TFLOP/s. On a GPU the
    result also holds the peak of allocated memory over the warm-up and timed calls. ``extra`` is stored with it.
    """
    def timed():
        fn()
        sync()

    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
    for _ in range(warmup):
        timed()
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, shapes=shapes, dtype=str(dtype).replace("torch.", ""),
                                bytes=bytes, flops=flops, **environment())
    benchmark.pedantic(timed, rounds=rounds or ROUNDS, iterations=1)
    median = benchmark.stats.stats.median
    peak = torch.cuda.max_memory_allocated(DEVICE) if DEVICE.type == "cuda" else None
    RESULTS.append({"group": group, "provider": provider, "median_s": median,
                    "min_s": benchmark.stats.stats.min, "shapes": shapes,
                    "dtype": str(dtype).replace("torch.", ""), "bytes": bytes, "flops": flops,
                    "peak_bytes": peak, **(extra or {})})
    save_results()
    return median


def release_memory() -> None:
    """Free what the previous case left (its graphs, compiled code, cached blocks): cases must not see each
    other's memory."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
        torch.cuda.empty_cache()


def numbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
