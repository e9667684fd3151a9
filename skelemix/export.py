"""``python -m skelemix.export``: a trained encoder, without the MoCo parts, as ONNX and as a torch.export program.

::

    python -m skelemix.export --checkpoint CKPT --out DIR [--format onnx pt2] [--opset 18]

Writes ``encoder.onnx`` (input ``x`` ``(N, C, T, V, M)``, output ``features`` ``(N, D)``; N and T dynamic) and
``encoder.pt2`` (``torch.export.save``; run it with ``torch.export.load(path).module()(x)``), and ``export.json``
(layout, channels, view, training frames, feature size, opset, and the checks below). Both compute what
:func:`skelemix.load_encoder` computes: prepared sequences in, the pooled features of the view the encoder was
trained on out.

The fused ops are exported through their eager reference (``impl="eager"``): it is made of standard PyTorch
operators, so the ONNX graph holds standard ONNX operators only (Conv, Einsum, BatchNormalization, ReduceSum,
...) and the program core ATen operators only. Either then runs anywhere (onnxruntime, TensorRT, OpenVINO,
ExecuTorch, a PyTorch without skelemix), and the runtime's own graph optimiser fuses what it can. Exporting the
C++/CUDA/Triton kernels instead would need a custom operator, with its own kernel, in every target runtime.

After writing, each file is run on a random batch of another size and length than the one it was traced with,
and its features are compared with the package's (``impl=eager``); a difference above 1e-4 is an error.
ONNX export needs the ``export`` extra (``pip install onnx onnxscript onnxruntime``); without onnxruntime the
ONNX file is written but not run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import warnings
from pathlib import Path

import torch

from . import cli

FORMATS = ("onnx", "pt2")
MIN_OPSET = 17
TOLERANCE = 1e-4  # the export check's bound; the tests hold the exported models to 1e-5
CHECK_SHAPE = (3, 23)  # batch and frames of the check: neither is what the export traced


def _example(encoder, batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    """A random input of the encoder's shape ``(batch, C, frames, V, M)``."""
    C, V = encoder.stgcn.in_channels, encoder.layout.num_joints
    bodies = (encoder.recipe or {}).get("bodies") or 2
    return torch.randn(batch, C, frames, V, int(bodies), generator=torch.Generator().manual_seed(seed))


def _dynamic_shapes():
    dim = torch.export.Dim.DYNAMIC
    return {"x": {0: dim, 2: dim}}


@contextlib.contextmanager
def _quiet():
    """Silence torch's exporters where they warn about their own internals (torch.onnx logs every torchvision op
    it cannot register, and the pytree code of torch 2.13 warns about a deprecated spec class)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*treespec.*")
            yield
    finally:
        logger.setLevel(level)


def min_frames(program: torch.export.ExportedProgram) -> int | None:
    """The shortest sequence ``program`` accepts: torch.export specialises lengths whose last feature map would
    have one frame (4 frames or fewer with the encoder's stride of 4), and the program refuses them."""
    try:
        x = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "x")
        frames = x.meta["val"].shape[2]
        return int(program.range_constraints[frames.node.expr].lower) if isinstance(frames, torch.SymInt) else None
    except (StopIteration, AttributeError, KeyError, TypeError, ValueError):
        return None


def export_program(encoder, path: str | os.PathLike) -> torch.export.ExportedProgram:
    """``encoder`` (built with ``impl="eager"``) as a torch.export program with dynamic batch and frames, saved at
    ``path`` (``.pt2``)."""
    with _quiet():
        program = torch.export.export(encoder, (_example(encoder, 2, max(encoder.frames, 8)),),
                                      dynamic_shapes=_dynamic_shapes())
        torch.export.save(program, str(path))
    return program


def require_onnx() -> None:
    """Raise a one-line error naming the extra when the ONNX exporter's dependencies are missing."""
    missing = [m for m in ("onnx", "onnxscript") if not _importable(m)]
    if missing:
        raise ValueError(f"ONNX export needs {' and '.join(missing)} (pip install onnx onnxscript onnxruntime, or "
                         "pip install -e .[export]); --format pt2 needs nothing more")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def export_onnx(encoder, path: str | os.PathLike, opset: int = 18) -> None:
    """``encoder`` (built with ``impl="eager"``) as an ONNX model at ``path``: input ``x`` with dynamic batch and
    frames, output ``features``."""
    if opset < MIN_OPSET:
        raise ValueError(f"--opset must be >= {MIN_OPSET}; got {opset}")
    require_onnx()
    with _quiet():
        program = torch.onnx.export(encoder, (_example(encoder, 2, max(encoder.frames, 8)),), dynamo=True,
                                    opset_version=opset, dynamic_shapes=_dynamic_shapes(), input_names=["x"],
                                    output_names=["features"], verbose=False)
        program.save(str(path))


def run_onnx(path: str | os.PathLike, x: torch.Tensor) -> torch.Tensor:
    """The features of the ONNX model at ``path`` for ``x``, computed by onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["features"], {"x": x.numpy()})[0])


def check(reference: torch.Tensor, exported: torch.Tensor, what: str) -> float:
    """The largest absolute difference; above :data:`TOLERANCE` it is an error naming ``what``."""
    if exported.shape != reference.shape:
        raise RuntimeError(f"{what} gives features of shape {tuple(exported.shape)}, the package "
                           f"{tuple(reference.shape)}")
    diff = float((exported - reference).abs().max())
    if not diff <= TOLERANCE:
        raise RuntimeError(f"{what} differs from the package by up to {diff:.3g} (more than {TOLERANCE:g})")
    return diff


def run(args) -> dict:
    from .embed import load_encoder

    formats = list(dict.fromkeys(args.format))
    if "onnx" in formats:
        require_onnx()  # before anything is written
    encoder = load_encoder(args.checkpoint, "cpu", impl="eager", config=args.config, overrides=args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x = _example(encoder, *CHECK_SHAPE, seed=1)
    with torch.no_grad():
        reference = encoder(x)
    info = {"checkpoint": encoder.path, "layout": encoder.layout.to_dict(), "channels": encoder.channels,
            "view": encoder.view, "bodies": int(x.shape[-1]), "training_frames": encoder.frames,
            "feature_dim": encoder.feature_dim, "input": "x (N, C, T, V, M), float32; N and T dynamic",
            "output": "features (N, D), float32", "files": {}}
    if "pt2" in formats:
        path = out / "encoder.pt2"
        shortest = min_frames(export_program(encoder, path))
        with torch.no_grad(), _quiet():
            diff = check(reference, torch.export.load(str(path)).module()(x), path.name)
        info["files"][path.name] = {"max_abs_diff_vs_package": diff, "check_shape": list(x.shape),
                                    "min_frames": shortest}
        print(f"wrote {path} (torch.export program for T >= {shortest}; checked on {tuple(x.shape)}: max "
              f"|difference| {diff:.1e})")
    if "onnx" in formats:
        path = out / "encoder.onnx"
        export_onnx(encoder, path, args.opset)
        entry = {"opset": args.opset}
        if _importable("onnxruntime"):
            diff = check(reference, run_onnx(path, x), path.name)
            entry.update(max_abs_diff_vs_package=diff, check_shape=list(x.shape))
            note = f"checked with onnxruntime on {tuple(x.shape)}: max |difference| {diff:.1e}"
        else:
            entry["max_abs_diff_vs_package"] = None
            note = "not run: onnxruntime is not installed"
        info["files"][path.name] = entry
        print(f"wrote {path} (ONNX opset {args.opset}; {note})")
    (out / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m skelemix.export", description=__doc__.splitlines()[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint of `python -m skelemix.train` or `evaluate`, or "
                                                       "an official SkeleMixCLR state dict")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), help="what to write (default both)")
    p.add_argument("--opset", type=int, default=18, help=f"ONNX opset (>= {MIN_OPSET}; default 18)")
    p.add_argument("--config", default=None, help="architecture config (YAML) for official checkpoints")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for official checkpoints")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    if args.opset < MIN_OPSET:
        p.error(f"--opset must be >= {MIN_OPSET}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
