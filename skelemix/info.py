"""``python -m skelemix.info``: versions, what the compiled ops were built with, and which implementation
``impl="auto"`` picks here. Paste its output into bug reports.

``--check`` also runs the self-check of every implementation present here (:mod:`skelemix.selfcheck`: each
against the eager reference on small random inputs, forward and backward, for every floating dtype) and prints
one table per device (the C++ ops on the CPU; the CUDA and Triton ones on a GPU) with the choice ``impl="auto"``
makes from it. Exit status 1 when an implementation fails its check."""
from __future__ import annotations

import argparse
import importlib
import platform
from dataclasses import dataclass

import torch

from . import _extension, cli, selfcheck
from .ops._impl import _AUTO_UNSUPPORTED, _usable, auto_candidates


def _auto_choice(device: str) -> str:
    names = auto_candidates(torch.device(device), ("eager", "cpp", "cuda", "triton"))
    # For an op that has every implementation; ops/<op>.py lists what each op has.
    if device == "cuda" and names[0] != "eager":
        return f"{names[0]} (once its self-check passes on this GPU; else the next of {', '.join(names[1:])})"
    return names[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skelemix.info", description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="also check every implementation against the eager reference here and print the table")
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    return cli.run(lambda: _report() or (_check() if args.check else 0), debug=args.debug)


def _report() -> int:
    import numpy

    import skelemix
    from skelemix import _extension

    info = _extension.build_info()
    gpu = torch.cuda.get_device_name(0) if info["cuda_available"] else "none visible"
    lines = [
        f"python: {platform.python_version()}",
        f"torch: {info['torch']} (CUDA {info['torch_cuda'] or 'none: CPU build'}; GPU: {gpu})",
        f"numpy: {numpy.__version__}",
        f"skelemix: {skelemix.__version__} ({skelemix.__file__})",
    ]
    if info["cpp"]:
        lines.append(f"C++ ops (skelemix._C): CPU yes, built against torch {info['built_torch']}")
        if info["cuda_kernels"]:
            lines.append(f"CUDA ops: yes (CUDA {info['cuda_version']}, arch {info['cuda_arch']})")
        else:
            lines.append(f"CUDA ops: no ({_extension.available('cuda')[1]})")
    else:
        lines.append(f"C++ ops (skelemix._C): no ({info['load_error']})")
        lines.append("CUDA ops: no")
    if info["triton"]:
        lines.append(f"triton: {info['triton_version']} (TRITON_INTERPRET={int(info['triton_interpret'])})")
    else:
        lines.append(f"triton: no ({info['triton_error']})")
    lines.append(f"impl=auto picks for CPU tensors: {_auto_choice('cpu')}")
    lines.append(f"impl=auto picks for CUDA tensors: {_auto_choice('cuda')}")
    print("\n".join(lines))
    return 0


def _cell(value) -> str:
    if isinstance(value, str):
        return value
    status = "pass" if value.ok else "FAIL"
    return f"{status} {value.max_error:.1e}" if value.max_error != float("inf") else status


def _check() -> int:
    """The self-check table of every device here, printed one op at a time (a run cut short keeps what it
    printed); 1 if any implementation failed."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    dtypes = DTYPES
    names = [str(d).replace("torch.", "") for d in dtypes]
    failures = []

    def say(*lines):
        print("\n".join(lines), flush=True)

    for device in devices:
        auto = ("impl=auto probes each before its first use" if device in selfcheck.PROBED_DEVICE_TYPES else
                "impl=auto uses them unprobed: CI tests the CPU kernels")
        say("", f"self-check on {device} ({selfcheck.device_name(selfcheck.normal_device(device))}): each "
            "implementation against the eager reference on random inputs, forward and backward, with the largest "
            f"error relative to the largest value; {auto}", "", "| op | impl | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names))
        unavailable = {}
        for op in selfcheck.OPS:
            rows, picks = check_op(op, device, dtypes)
            for row in rows:
                say(f"| {op} | {row.impl} | " + " | ".join(_cell(row.cells[d]) for d in dtypes) + " |")
                if row.why:
                    unavailable[row.impl] = row.why
                failures += [f"{op} impl={row.impl} {name} on {device}: {cell.error}" for d, name in zip(dtypes, names)
                             if not isinstance(cell := row.cells[d], str) and not cell.ok]
            say(f"| {op} | auto picks | " + " | ".join(picks[d] for d in dtypes) + " |")
        if unavailable:
            say("", *(f"{impl} unavailable: {why}" for impl, why in unavailable.items()))
    if "cuda" not in devices:
        say("", f"cuda: not checked: {_extension.available('cuda')[1]}")
    if failures:
        say("", "FAILED (a bug: please report it with this output):", *(f"  {f}" for f in failures))
    return 1 if failures else 0


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
    device = selfcheck.normal_device(device)
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
                cells[dtype] = selfcheck.probe(op, implementations[impl], device, dtype)
                if cells[dtype].ok:
                    passed.add((impl, dtype))
            rows.append(Row(op, impl, cells))
    picks = {}
    for dtype in dtypes:
        candidates = auto_candidates(device, implementations, dtype)
        if device.type in selfcheck.PROBED_DEVICE_TYPES:
            candidates = [name for name in candidates if name == "eager" or (name, dtype) in passed]
        picks[dtype] = candidates[0]
    return rows, picks


if __name__ == "__main__":
    raise SystemExit(main())
