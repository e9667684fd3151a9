"""``python -m skelemix.data``: prepare raw datasets, export PYSKL pickles, write the generated demo data.

    python -m skelemix.data prepare ntu60   --raw nturgb+d_skeletons --out data/ntu60 [--frames 64]
    python -m skelemix.data prepare ntu120  --raw nturgb+d_skeletons nturgbd_skeletons_s018_to_s032 --out data/ntu120
    python -m skelemix.data prepare pkummd  --raw PKUMMD --out data/pkummd1 --split-file cross-subject.txt
    python -m skelemix.data prepare nwucla  --raw NW-UCLA --out data/nwucla
    python -m skelemix.data prepare pyskl   --raw ntu60_3danno.pkl --out data/pyskl_ntu60
    python -m skelemix.data export pyskl    --prepared data/ntu60/xsub --out ntu60_xsub.pkl
    python -m skelemix.data synth --out DIR
"""
from __future__ import annotations

import argparse

from .. import cli
from .synthetic import write_synthetic


def _prepare(args) -> int:
    common = dict(frames=args.frames, skip_bad=args.skip_bad, workers=args.workers, progress=not args.no_progress,
                  force=args.force)
    quirks = dict(official=args.official_preprocessing)
    if args.dataset in ("ntu60", "ntu120"):
        from .ntu import prepare_ntu
        report = prepare_ntu(args.raw, args.out, version=int(args.dataset[3:]), bodies=args.bodies,
                             ignore_list=args.ignore_list, **quirks, **common)
    elif args.dataset == "pkummd":
        from .pkummd import prepare_pkummd
        report = prepare_pkummd(_one(args.raw), args.out, split_file=args.split_file, test_view=args.test_view,
                                **quirks, **common)
    elif args.dataset == "nwucla":
        from .nwucla import prepare_nwucla
        report = prepare_nwucla(_one(args.raw), args.out, centre=args.centre, tuning=args.tuning, **quirks, **common)
    else:
        from .pyskl import prepare_pyskl
        report = prepare_pyskl(_one(args.raw), args.out, layout=args.layout, preprocessing=args.preprocessing,
                               **quirks, **common)
    print(report.summary())
    return 0


def _one(raw):
    if len(raw) != 1:
        raise SystemExit(f"--raw takes one path for this dataset; got {len(raw)}")
    return raw[0]


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line: the usage is one ``--help`` away."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _layout(text: str) -> str:
    from ..graph import LAYOUTS

    if text in LAYOUTS or text.endswith((".yaml", ".yml")):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(sorted(LAYOUTS))} or a "
                                     "layout .yaml file)")


def _parser() -> _Parser:
    p = _Parser(prog="python -m skelemix.data", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    _add_prepare(sub.add_parser("prepare", help="convert a raw dataset into prepared training arrays"))

    exp = sub.add_parser("export", help="write a prepared dataset in another format")
    exp.add_argument("format", choices=("pyskl",))
    exp.add_argument("--prepared", required=True, help="prepared dataset folder (with meta.json)")
    exp.add_argument("--out", required=True, help="the .pkl file to write")

    synth = sub.add_parser("synth", help="generated skeleton actions in the prepared-dataset format")
    synth.add_argument("--out", required=True)
    synth.add_argument("--train", type=int, default=880)
    synth.add_argument("--val", type=int, default=440)
    synth.add_argument("--frames", type=_at_least_one, default=64)
    synth.add_argument("--seed", type=int, default=0)
    cli.add_debug_flag(p)
    return p


def _add_prepare(prep: argparse.ArgumentParser) -> None:
    prep.add_argument("dataset", choices=("ntu60", "ntu120", "pkummd", "nwucla", "pyskl"))
    prep.add_argument("--raw", required=True, nargs="+", help="raw data folder(s) (NTU: the .skeleton folders; "
                      "PKU-MMD: the folder holding the skeleton and label folders; NW-UCLA: the folder holding "
                      "all_sqe/; PYSKL: the annotation .pkl)")
    prep.add_argument("--out", required=True, help="output folder (one sub-folder per benchmark)")
    prep.add_argument("--frames", type=_at_least_one, default=64, help="frames per sample after the temporal resize")
    prep.add_argument("--bodies", choices=("tracked", "official"), default="tracked",
                      help="NTU body selection: track bodies by bodyID and keep the two most active (default), or "
                      "the official first-two-bodies-per-frame rule")
    prep.add_argument("--official-preprocessing", action="store_true",
                      help="reproduce the official preprocessing quirks (length count, sequence-wide rotation sign, "
                      "epsilon in the angle)")
    prep.add_argument("--ignore-list", help="NTU: file of sample names to leave out (e.g. the official "
                      "NTU_RGBD*_samples_with_missing_skeletons.txt)")
    prep.add_argument("--split-file", help="PKU-MMD: the official cross-subject.txt (needed for xsub)")
    prep.add_argument("--test-view", choices=("L", "M", "R"), default="L",
                      help="PKU-MMD cross-view: the test view (default L)")
    prep.add_argument("--layout", type=_layout, default=None,
                      help="PYSKL: the layout of the keypoints (coco-17, nw-ucla, ntu-rgb+d or a layout .yaml file), "
                      "checked against their joint count (default: the shipped layout of that joint count)")
    prep.add_argument("--preprocessing", choices=("full", "resize"), default="full",
                      help="PYSKL: full = centre, resize, align shoulders; resize = temporal resize only")
    prep.add_argument("--centre", choices=("frame", "first"), default="frame",
                      help="NW-UCLA: frame = every frame on its own shoulder centre (the NTU convention); first = "
                      "all frames on the first frame's, keeping a walker's path")
    prep.add_argument("--tuning", action="store_true", help="NW-UCLA: train on view 1, validate on view 2 and "
                      "leave the test view 3 out (for choosing settings without looking at the test view)")
    prep.add_argument("--skip-bad", action="store_true", help="leave malformed inputs out and list them instead "
                      "of stopping at the first")
    prep.add_argument("--workers", type=_at_least_one, default=None, help="parsing processes (default: all cores)")
    prep.add_argument("--force", action="store_true", help="redo benchmarks that are already prepared")
    prep.add_argument("--no-progress", action="store_true")


def _run(args) -> int:
    if args.command == "prepare":
        return _prepare(args)
    if args.command == "export":
        from .pyskl import export_pyskl
        n = export_pyskl(args.prepared, args.out)
        print(f"wrote {n} annotations to {args.out}")
        return 0
    write_synthetic(args.out, args.train, args.val, args.frames, args.seed)
    print(f"wrote {args.train} train and {args.val} val sequences of {args.frames} frames to {args.out}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except BaseException as err:  # noqa: BLE001 - handle() re-raises everything but user errors and Ctrl-C
        skippable = getattr(err, "skippable", False)  # set on per-file errors that --skip-bad would skip
        return cli.handle(err, args.debug, exit_code=1,
                          hint=" (--skip-bad leaves such inputs out and lists them)" * skippable,
                          interrupted="interrupted: the finished samples are kept; run the same command again to "
                                      "resume")


if __name__ == "__main__":
    raise SystemExit(main())
