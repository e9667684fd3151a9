"""Pictures: training curves, confusion matrices, feature embeddings, and ``python -m skelemix.viz mix``.

``python -m skelemix.viz mix`` renders one sequence, its partner and their SkeleMix result (docs/DESIGN.md 3)
as a PNG grid and an animated GIF; ``python -m skelemix.viz curves RUN/metrics.jsonl`` redraws a run's
training curves; ``python -m skelemix.viz compare LABEL=RUN/metrics.jsonl ...`` draws several runs' loss and
kNN curves on one picture (runs with the same label, e.g. seeds, share a colour). This module is the command;
the pictures are drawn by :mod:`skelemix.plots` (curves, confusion matrices, embeddings) and
:mod:`skelemix.mix_drawing` (SkeleMix), whose functions import from here too.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from . import cli
from .graph import NTU, get_layout
from .metrics import read_metrics  # noqa: F401 (re-exported: skelemix.viz.read_metrics)
from .mix_drawing import animate_mix, mix_example, render_mix, scaled_tem_range  # noqa: F401 (skelemix.viz API)
from .plots import pca_2d, plot_compare, plot_confusion, plot_curves, plot_embedding  # noqa: F401 (skelemix.viz API)

SYNTHETIC_SAMPLES = 32  # generated sequences `viz mix --data synthetic` picks from


# ------------------------------------------------------------------------------------------------- CLI
def _load_sequences(args) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """Two sequences ``(C, T, V, M)`` (index and partner), their class names and a description with the data's
    ``layout`` and ``channels``."""
    if args.data == "synthetic":
        from .data.synthetic import CLASSES, make_synthetic

        data, labels = make_synthetic(SYNTHETIC_SAMPLES, frames=args.length, seed=args.seed)
        classes, source = list(CLASSES), f"synthetic data (seed {args.seed}, {args.length} frames)"
        pick = lambda i: (data[i], int(labels[i]))  # noqa: E731
        size, layout, channels = SYNTHETIC_SAMPLES, NTU, "x,y,z"
    else:
        from .data import PreparedDataset
        from .data.prepared import channels_of

        root = Path(args.data)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder not found: {root}; pass a prepared dataset folder (see "
                                    "`python -m skelemix.data`) or 'synthetic'")
        ds = PreparedDataset(root, args.split)
        classes, source = list(ds.meta["classes"]), f"{root} ({args.split})"
        pick = lambda i: (np.array(ds.data[ds.indices[i]], dtype=np.float32), int(ds.targets[i]))  # noqa: E731
        size, layout, channels = len(ds), get_layout(ds.meta["layout"]), channels_of(ds.meta, root / "meta.json")
    if not 0 <= args.index < size:
        raise ValueError(f"--index {args.index} is outside the {size} samples of {source}")
    if args.partner is None:
        rng = np.random.default_rng(args.seed)
        partner = int(rng.integers(0, size - 1))
        partner += partner >= args.index  # anything but the sample itself
    else:
        partner = args.partner
        if not 0 <= partner < size or partner == args.index:
            raise ValueError(f"--partner {partner} must be another sample in [0, {size})")
    (x, yx), (p, yp) = pick(args.index), pick(partner)
    return x, p, [classes[yx], classes[yp]], {"source": source, "partner": partner, "layout": layout,
                                               "channels": channels}


def _mix_command(args) -> int:
    x, p, names, info = _load_sequences(args)
    T = x.shape[1] - x.shape[1] % 4  # whole blocks of the encoder's temporal stride
    x, p = x[:, :T], p[:, :T]
    layout = info["layout"]
    ex = mix_example(torch.from_numpy(x), torch.from_numpy(p), seed=args.seed, layout=layout)
    mixed = ex["mixed"].numpy()
    if info["channels"] != "x,y,z":  # image coordinates: y grows downward, so draw -y
        flip = np.ones((x.shape[0], 1, 1, 1), np.float32)
        flip[1] = -1
        x, p, mixed = x * flip, p * flip, mixed * flip
    out = Path(args.out)
    title = (f"SkeleMix ({layout.name}): sample {args.index} ({names[0]}) + partner {info['partner']} ({names[1]}); "
             f"pasted parts {', '.join(ex['parts'])}; frames {ex['window'][0]}-{ex['window'][1] - 1} of {T}")
    png = render_mix(x, p, mixed, ex["joints"], ex["window"], out / "mix.png", columns=args.frames, layout=layout,
                     title=title)
    gif = animate_mix(x, p, mixed, ex["joints"], ex["window"], out / "mix.gif", layout=layout, step=args.step)
    print(title)
    print(f"data: {info['source']}; temporal range {ex['tem_range']} blocks of 4 frames; wrote {png} and {gif}")
    return 0


def _curves_command(args) -> int:
    out = Path(args.out) if args.out else Path(args.metrics).parent
    written = plot_curves(args.metrics, out)
    print("wrote " + (", ".join(map(str, written)) if written else "nothing (no epoch or knn records)"))
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m skelemix.viz", description=__doc__.splitlines()[0].replace("``", ""))
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mix", help="render a sequence, its partner and their SkeleMix result (PNG grid + GIF)")
    m.add_argument("--data", default="synthetic", help="prepared dataset folder, or 'synthetic' (default)")
    m.add_argument("--split", default="train", help="split of a prepared dataset (default train)")
    m.add_argument("--index", type=int, default=0, help="the sample (default 0)")
    m.add_argument("--partner", type=int, default=None, help="the partner sample (default: drawn from --seed)")
    m.add_argument("--seed", type=int, default=0, help="seed of the partner, the region and synthetic data")
    m.add_argument("--out", default="runs/viz", help="output folder (default runs/viz)")
    m.add_argument("--frames", type=int, default=8, help="frames (columns) in the PNG grid (default 8)")
    m.add_argument("--length", type=int, default=64, help="frames of a synthetic sequence (default 64)")
    m.add_argument("--step", type=int, default=1, help="draw every STEP-th frame in the GIF (default 1)")
    c = sub.add_parser("curves", help="draw loss.png and knn.png from a trainer's metrics.jsonl")
    c.add_argument("metrics", help="path to metrics.jsonl")
    c.add_argument("--out", default=None, help="output folder (default: the folder of metrics.jsonl)")
    r = sub.add_parser("compare", help="draw several runs' loss and kNN curves on one picture")
    r.add_argument("runs", nargs="+", metavar="LABEL=METRICS",
                   help="a label and a trainer's metrics.jsonl; runs with the same label share a colour")
    r.add_argument("--out", default="runs/compare.png", help="the PNG to write (default runs/compare.png)")
    r.add_argument("--knn", default="knn@20", help="the kNN record to draw (default knn@20)")
    cli.add_debug_flag(p)
    return p.parse_args(argv)


def _compare_command(args) -> int:
    runs = []
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"compare: expected LABEL=PATH/metrics.jsonl; got {item!r}")
        runs.append((label, path))
    print(f"wrote {plot_compare(runs, args.out, args.knn)}")
    return 0


def _command(args) -> int:
    if args.command == "curves":
        return _curves_command(args)
    if args.command == "compare":
        return _compare_command(args)
    if args.frames < 1 or args.length < 4 or args.step < 1:
        raise ValueError("--frames and --step must be >= 1 and --length >= 4")
    return _mix_command(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: _command(args), debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
