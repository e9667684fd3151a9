"""Benchmark of skelemix_gather: eager reference vs the C++ kernels, at the paper's and a small shape.

    pytest bench/bench_skelemix_gather.py --benchmark-only [--benchmark-json out.json]

Throughput is ``GB/s = (bytes read + bytes written) / median time``, counting one read of x per output
element plus the output and mask writes (2 * mixed bytes + mask bytes); the index inputs are negligible.

CPU threads: ``SKELEMIX_BENCH_THREADS`` (default 1). On the shared 2-core development machine two threads
made the medians swing 10-100x (a parallel region waits for a descheduled thread), one thread is stable.
Providers: ``eager`` (the reference), ``eager+compile`` (``torch.compile`` of it; compiled in the warm-up
rounds), ``cpp``, and on a GPU ``cuda``.
"""
import os
import platform

import pytest
import torch

from skelemix import _extension, reference
from skelemix.ops import skelemix_gather

# (name, N, C, T, V, M, R, per_sample); block = 4, the encoder's temporal stride.
SHAPES = [
    ("paper", 128, 3, 64, 25, 2, 3, False),  # SkeleMixCLR+: batch 128, 3 repeats of a view
    ("paper_per_sample", 128, 3, 64, 25, 2, 3, True),
    ("small", 16, 3, 64, 25, 2, 3, False),  # batch 16, the size of the CPU demo step
]
BLOCK = 4
_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PROVIDERS = [
    ("eager", "cpu"),
    ("eager+compile", "cpu"),
    ("cpp", "cpu"),
    pytest.param("eager", "cuda", marks=_cuda),
    pytest.param("eager+compile", "cuda", marks=_cuda),
    pytest.param("cuda", "cuda", marks=_cuda),
]
_compiled = torch.compile(reference.skelemix_gather)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SKELEMIX_BENCH_THREADS", "1")))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


def make_inputs(N, C, T, V, M, R, per_sample, device, dtype):
    g = torch.Generator().manual_seed(0)
    blocks, G = T // BLOCK, N if per_sample else 1
    x = torch.randn(N, C, T, V, M, generator=g, dtype=dtype).to(device)
    partner = ((torch.arange(N) + torch.randint(1, N, (R, 1), generator=g)) % N).to(device)
    joints = (torch.rand(R, G, V, generator=g) < 0.5).to(device)
    length = torch.randint(7, 12, (R, G), generator=g)
    start = (torch.rand(R, G, generator=g) * (blocks - length + 1)).long()
    span = torch.stack((start, start + length), dim=-1).to(device)
    return x, partner, joints, span


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("provider, device", PROVIDERS)
def test_skelemix_gather(benchmark, threads, provider, device, shape, dtype):
    name, N, C, T, V, M, R, per_sample = shape
    if provider in ("cpp", "cuda"):
        ok, why = _extension.available(provider)
        if not ok:
            pytest.skip(why)
    x, partner, joints, span = make_inputs(N, C, T, V, M, R, per_sample, device, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        # The eager provider is the oracle itself (no wrapper checks), as SkeleMix used it before the kernel.
        if provider == "eager":
            out = reference.skelemix_gather(x, partner, joints, span, BLOCK)
        elif provider == "eager+compile":
            out = _compiled(x, partner, joints, span, BLOCK)
        else:
            out = skelemix_gather(x, partner, joints, span, BLOCK, impl=provider)
        sync()
        return out

    benchmark.group = f"skelemix_gather {name} {device} {str(dtype).replace('torch.', '')} fwd"
    mixed, mask = benchmark.pedantic(run, rounds=30, iterations=1, warmup_rounds=3)
    expected = reference.skelemix_gather(x, partner, joints, span, BLOCK)
    assert torch.equal(mixed, expected[0]) and torch.equal(mask, expected[1])
    moved = 2 * mixed.numel() * mixed.element_size() + mask.numel()
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "shape": f"N={N} C={C} T={T} V={V} M={M} R={R} G={N if per_sample else 1} block={BLOCK}",
        "bytes": moved, "GB/s": round(moved / median / 1e9, 2), "threads": threads,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
    })
