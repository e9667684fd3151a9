"""``python -m skelemix.data synth --out DIR``: write the generated demo data as a prepared dataset."""
from __future__ import annotations

import argparse

from .synthetic import write_synthetic


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m skelemix.data")
    sub = p.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="generated skeleton actions in the prepared-dataset format")
    synth.add_argument("--out", required=True)
    synth.add_argument("--train", type=int, default=880)
    synth.add_argument("--val", type=int, default=440)
    synth.add_argument("--frames", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    write_synthetic(args.out, args.train, args.val, args.frames, args.seed)
    print(f"wrote {args.train} train and {args.val} val sequences of {args.frames} frames to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
