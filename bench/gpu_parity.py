"""Short parity run of every fused op's GPU implementations against the eager reference, on the samples of
:mod:`skelemix.testing` (forward, and backward where the op has one). Small on purpose: it runs under
compute-sanitizer in ``bench/device_check.sh``, so each case is printed (and flushed) as it finishes: a run
cut short by its time limit still reports the cases it passed. Exit status 1 on any mismatch.

    python -m bench.gpu_parity [--impl cuda triton]
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Iterator

import torch

from skelemix import _extension, reference, testing

OPS = ("mask_pool", "graph_conv", "skelemix_gather", "bn_epilogue")
FORWARD_ONLY = ("skelemix_gather",)  # no backward: its inputs never require grad


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _atol(expected: torch.Tensor, rtol: float, atol: float) -> float:
    """Absolute tolerance scaled by the largest expected value: sums of many terms (graph_conv's contractions)
    cancel to near zero in places, where only an error relative to the operands' scale is meaningful."""
    if not expected.is_floating_point() or expected.numel() == 0:
        return atol
    return atol + rtol * float(expected.detach().abs().max())


def check(op: str, impl: str, dtype: torch.dtype, device: str = "cuda") -> Iterator[str]:
    """One line per case, yielded as soon as the case is done: ``ok ...``, ``FAIL ...`` or ``SKIP ...``."""
    module = importlib.import_module(f"skelemix.ops.{op}")
    samples = getattr(testing, f"sample_inputs_{op}", None)
    if impl not in module._IMPLEMENTATIONS or samples is None:
        yield f"SKIP {op} impl={impl}: not implemented"
        return
    fn, ref = getattr(module, op), getattr(reference, op)
    rtol, atol = testing.tolerances(dtype)

    def leaves(sample_args):
        grad = op not in FORWARD_ONLY
        return [a.detach().requires_grad_(grad and a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                for a in sample_args]

    for sample in samples(device=device, dtype=dtype):
        args, ref_args = leaves(sample.args), leaves(sample.args)
        name = f"{op} impl={impl} {str(dtype)[6:]} {sample.name}"
        try:
            got, want = _outputs(fn(*args, impl=impl)), _outputs(ref(*ref_args))
            for i, (g, w) in enumerate(zip(got, want)):
                testing.assert_close_verbose(g, w, rtol, _atol(w, rtol, atol), f"{name} output {i}")
            diffs = [(g, w) for g, w in zip(got, want) if g.requires_grad and g.numel()]
            if diffs:
                grads = [torch.randn_like(w) for _, w in diffs]
                inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
                ref_inputs = [a for a in ref_args if isinstance(a, torch.Tensor) and a.requires_grad]
                g_got = torch.autograd.grad([g for g, _ in diffs], inputs, grads, allow_unused=True)
                g_want = torch.autograd.grad([w for _, w in diffs], ref_inputs, grads, allow_unused=True)
                for j, (a, b) in enumerate(zip(g_got, g_want)):
                    if b is not None:
                        testing.assert_close_verbose(a, b, rtol, _atol(b, rtol, atol), f"{name} grad {j}")
            if device == "cuda":
                torch.cuda.synchronize()
            yield f"ok   {name}"
        except Exception as err:  # noqa: BLE001 - every failure is reported, then the run fails
            yield f"FAIL {name}: {type(err).__name__}: {err}"


def check_dropout_mask(impl: str, device: str = "cuda") -> str:
    """bn_epilogue's dropout mask across the 2**32 counter boundary (flat indices beyond any sample's size),
    computed as the kernels compute it, against the reference bit for bit."""
    seed, start, numel, p = torch.tensor([0x0123456789ABCDEF], device=device), 2**32 - 512, 1024, 0.3
    if impl == "triton":
        from skelemix.kernels import bn_epilogue as kernels

        got = kernels.dropout_keep(seed, torch.arange(start, start + numel, device=device), p)
    else:
        got = torch.ops.skelemix._bn_epilogue_dropout_keep(seed, start, numel, p)
    differ = int((got.cpu() != reference.dropout_keep(seed.cpu(), (numel,), p, offset=start)).sum())
    name = f"bn_epilogue impl={impl} dropout mask across 2**32"
    return f"ok   {name}" if differ == 0 else f"FAIL {name}: {differ} of {numel} elements differ"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", nargs="+", default=["cuda", "triton"])
    p.add_argument("--dtype", nargs="+", default=["float32"])
    p.add_argument("--device", default="cuda", help="cpu checks this script itself with --impl cpp")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible")
        return 1
    torch.manual_seed(0)
    done = failed = 0

    def report(line: str) -> None:
        nonlocal done, failed
        print(line, flush=True)
        done += 1
        failed += line.startswith("FAIL")

    for impl in args.impl:
        ok, why = _extension.available(impl)
        if not ok:
            report(f"FAIL impl={impl} unavailable: {why}")
            continue
        for op in OPS:
            for dtype in args.dtype:
                for line in check(op, impl, getattr(torch, dtype), args.device):
                    report(line)
        report(check_dropout_mask(impl, args.device))
    print(f"{done - failed} ok/skipped, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
