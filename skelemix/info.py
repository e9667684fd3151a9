"""``python -m skelemix.info``: versions, what the compiled ops were built with, and which implementation
``impl="auto"`` picks here. Paste its output into bug reports."""
from __future__ import annotations

import argparse
import platform

import torch

from . import cli


def _auto_choice(device: str) -> str:
    from .ops._impl import select

    # select() returns the entry it picks; with names as entries, it returns the name.
    names = {name: name for name in ("eager", "cpp", "cuda", "triton")}
    return select("info", "auto", torch.device(device), names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skelemix.info", description=__doc__)
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    return cli.run(_report, debug=args.debug)


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
    # For an op that has every implementation; ops/<op>.py lists what each op has.
    lines.append(f"impl=auto picks for CPU tensors: {_auto_choice('cpu')}")
    lines.append(f"impl=auto picks for CUDA tensors: {_auto_choice('cuda')}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
