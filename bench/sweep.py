"""``python -m bench.sweep``: pretraining over seeds x variants, the evidence for any change that can alter what
the model learns (RNG, numerics, kernels, defaults): such a change is shown with a sweep, not with one run.

    python -m bench.sweep --seeds 20 --set model.epilogue=fused,modules [--config demo.yaml] [--out DIR] [--jobs 2]

runs ``python -m skelemix.train`` (the demo unless ``--config``) once per seed and variant, as parallel
single-thread processes. A ``--set`` with comma-separated values is a variant axis; the variants are the cartesian
product of the axes (commas inside brackets or quotes do not split: ``optim.steps=[10,20],[30]`` is two values);
a ``--set`` with one value applies to every run. Each finished run appends one JSON line to ``DIR/runs.jsonl``
(seed, variant, final loss and kNN, linear top-1 pretrained and at random init, wall time, exit status, folder);
the same command continues a half-finished sweep. At the end it draws ``DIR/sweep.png`` and prints the comparison:
per variant the escape rate (a run escapes the loss plateau when its linear top-1 reaches ``--escape-top1`` and
beats its random-init encoder by ``--escape-gain`` points) and the spread of top-1; per pair of variants Fisher's
exact test on the escape counts and the Mann-Whitney U test on top-1 (both two-sided and exact).
``--report DIR`` redraws and re-prints from ``runs.jsonl`` without running anything; ``--markdown`` prints the
tables in Markdown (for docs/RESULTS.md).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from math import comb
from pathlib import Path

import numpy as np
import yaml

# Keys the sweep sets for every run itself.
RESERVED = {"train.seed": "use --seeds and --first-seed", "train.out": "use --out",
            "train.final_linear_eval": "the sweep always runs the final linear evaluation"}


class SweepError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- statistics
def fisher_exact(a: int, b: int, c: int, d: int) -> float:
    """Two-sided p-value of Fisher's exact test on the table [[a, b], [c, d]]: the hypergeometric probability of
    all tables with the same margins that are no more likely than the observed one, summed in exact integers."""
    row1, row2, col1 = a + b, c + d, a + c
    weights = [comb(row1, x) * comb(row2, col1 - x) for x in range(max(0, col1 - row2), min(row1, col1) + 1)]
    observed = comb(row1, a) * comb(row2, c)
    return sum(w for w in weights if w <= observed) / comb(row1 + row2, col1)


def mann_whitney(x, y) -> tuple[float, float]:
    """Two-sided Mann-Whitney U test: (U of ``x``, p). The p-value is exact, also with ties: twice the smaller
    tail of the midrank sum of ``x`` over all C(n1 + n2, n1) splits of the pooled values (scipy's and R's
    two-sided convention), counted by dynamic programming over doubled, hence integer, midranks."""
    n1 = len(x)
    if not len(x) or not len(y):
        return math.nan, math.nan
    pooled = sorted([*x, *y])
    rank2 = {}  # value -> doubled midrank: first + last 1-based position of its tie group
    for value, group in itertools.groupby(enumerate(pooled, 1), key=lambda p: p[1]):
        positions = [i for i, _ in group]
        rank2[value] = positions[0] + positions[-1]
    ranks = [rank2[v] for v in pooled]
    counts = np.zeros((n1 + 1, sum(ranks) + 1))  # counts[k, s]: subsets of k values with doubled rank sum s
    counts[0, 0] = 1
    for r in ranks:
        counts[1:, r:] = counts[1:, r:] + counts[:-1, :counts.shape[1] - r]
    dist, observed = counts[n1], sum(rank2[v] for v in x)
    tail = min(dist[:observed + 1].sum(), dist[observed:].sum()) / dist.sum()
    return observed / 2 - n1 * (n1 + 1) / 2, min(1.0, 2 * tail)


# ---------------------------------------------------------------------------------------------- the plan
def split_values(text: str) -> list[str]:
    """``a,[1, 2],'b,c'`` -> ``["a", "[1, 2]", "'b,c'"]``: commas split only outside brackets and quotes."""
    values, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    return values + [text[start:].strip()]


def parse_sets(items: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``--set`` items -> (overrides for every run, variant axes ``{key: [value texts]}`` in the given order)."""
    fixed, axes, seen = [], {}, set()
    for item in items:
        if "=" not in item:
            raise SweepError(f"--set expects key=value or key=value1,value2,...; got {item!r}")
        key, text = (s.strip() for s in item.split("=", 1))
        if key in RESERVED:
            raise SweepError(f"--set {key}: the sweep sets it for every run ({RESERVED[key]})")
        if key in seen:
            raise SweepError(f"--set {key} is given twice; give all its values in one --set {key}=a,b")
        seen.add(key)
        values = split_values(text)
        if "" in values:
            raise SweepError(f"--set {key}: empty value in {text!r}")
        if len(values) != len(set(values)):
            raise SweepError(f"--set {key}: a value is repeated in {text!r}")
        if len(values) == 1:
            fixed.append(f"{key}={values[0]}")
        else:
            axes[key] = values
    return fixed, axes


def variants(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    """The cartesian product of the axes: ``{key: value text}`` per variant, the first value of each axis first."""
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def parsed(variant: dict[str, str]) -> dict:
    """A variant as it is recorded: its values parsed as the trainer parses ``--set`` values (YAML)."""
    return {k: yaml.safe_load(v) for k, v in variant.items()}


def label(variant: dict) -> str:
    return ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in variant.items()) or "all runs"


def _slug(text: str) -> str:
    return re.sub(r"[^\w.=,+-]+", "_", text).strip("_")


def run_key(seed: int, variant: dict) -> tuple:
    return seed, json.dumps(variant, sort_keys=True)


def plan(out: Path, config: str | None, fixed: list[str], axes: dict, seeds: list[int]) -> list[dict]:
    """The runs still to do, seed by seed (every variant of a seed before the next seed, so a half-finished sweep
    stays balanced). Runs recorded in ``runs.jsonl`` are skipped; the folder of an unrecorded run is removed (a run
    interrupted before its result restarts from scratch: its wall time stays a whole run's)."""
    settings = {"config": config, "fixed": sorted(fixed)}
    previous = read_state(out)
    if previous is not None and {k: previous.get(k) for k in settings} != settings:
        there, here = set(previous.get("fixed") or []), set(fixed)
        diff = ([f"--config {previous.get('config')} there, {config} here"] * (previous.get("config") != config)
                + [f"--set only there: {' '.join(sorted(there - here))}"] * bool(there - here)
                + [f"--set only here: {' '.join(sorted(here - there))}"] * bool(here - there))
        raise SweepError(f"{out} holds a sweep with other settings for every run ({'; '.join(diff)}). Use another "
                         "--out, or the same --config and single-value --set items to continue it")
    todo, dirs = [], {}
    for variant in variants(axes):
        name = _slug(label(variant).replace(", ", "-")) if variant else "default"
        if name in dirs.values():
            raise SweepError(f"two variants would share the run folder {out / name}: {label(variant)!r} and "
                             f"{label(next(v for v, d in dirs.items() if d == name))!r}")
        dirs[tuple(variant.items())] = name
    done = {run_key(r["seed"], r["variant"]) for r in load_runs(out, missing_ok=True)}
    for seed in seeds:
        for variant in variants(axes):
            if run_key(seed, parsed(variant)) in done:
                continue
            folder = out / dirs[tuple(variant.items())] / f"seed{seed}"
            if folder.exists():
                shutil.rmtree(folder)
            todo.append({"seed": seed, "variant": variant, "dir": folder})
    order = (previous or {}).get("variants", [])
    order += [v for v in map(parsed, variants(axes)) if v not in order]  # variants() has no duplicates
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({**settings, "variants": order}, indent=1) + "\n")
    return todo


def read_state(out: Path) -> dict | None:
    """``out/sweep.json``: the settings shared by every run of the sweep and the variants in planned order."""
    path = out / "sweep.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SweepError(f"{path}: not valid JSON ({err}); it is rewritten by a sweep with the same --out") from err
    if not isinstance(state, dict) or not isinstance(state.get("variants", []), list):
        raise SweepError(f"{path}: expected an object with a list of variants; got {str(state)[:80]}")
    return state


# ---------------------------------------------------------------------------------------------- running
def command(run: dict, config: str | None, fixed: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "skelemix.train", "--no-progress", "--seed", str(run["seed"]), "--out",
           str(run["dir"])] + (["--config", config] if config else [])
    for item in fixed + [f"{k}={v}" for k, v in run["variant"].items()] + ["train.final_linear_eval=true"]:
        cmd += ["--set", item]
    return cmd


def read_result(folder: Path) -> dict:
    """The final epoch loss, the last kNN monitor and the linear top-1 from a run's ``metrics.jsonl``."""
    from skelemix.viz import read_metrics

    path = folder / "metrics.jsonl"
    last = {r.get("kind"): r for r in (read_metrics(path) if path.is_file() else [])}
    knn = {k: v for k, v in last.get("knn", {}).items() if k.startswith("knn@")}
    return {"loss": last.get("epoch", {}).get("loss"), "knn": knn or None,
            "linear_top1": last.get("linear", {}).get("pretrained"),
            "linear_top1_random_init": last.get("linear", {}).get("random init")}


def sweep(todo: list[dict], config: str | None, fixed: list[str], out: Path, jobs: int) -> int:
    """Run ``todo`` with ``jobs`` processes at a time, appending each finished run to ``out/runs.jsonl``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the trainer has no thread setting
    pending, running, finished = list(todo), {}, 0
    try:
        while pending or running:
            while pending and len(running) < jobs:
                run = pending.pop(0)
                run["dir"].mkdir(parents=True)
                log = open(run["dir"] / "log.txt", "w")
                proc = subprocess.Popen(command(run, config, fixed), stdout=log, stderr=subprocess.STDOUT, env=env)
                running[proc] = (run, log, time.perf_counter())
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                run, log, start = running.pop(proc)
                log.close()
                finished += 1
                where = f"[{finished}/{len(todo)}] {label(run['variant'])}, seed {run['seed']}"
                if proc.returncode < 0 or proc.returncode == 130:  # killed or interrupted: not a result
                    print(f"{where}: stopped by a signal (exit {proc.returncode}); not recorded, the next sweep "
                          "restarts it", flush=True)
                    continue
                record = {"seed": run["seed"], "variant": parsed(run["variant"]), "exit": proc.returncode,
                          **read_result(run["dir"]), "wall_s": round(time.perf_counter() - start, 1),
                          "out": str(run["dir"])}
                with open(out / "runs.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"{where}: " + (f"top-1 {record['linear_top1']:.1f}% (random init "
                                      f"{record['linear_top1_random_init']:.1f}%), loss {record['loss']:.3f}, "
                                      f"{record['wall_s']:.0f}s" if _ok(record) else
                                      f"failed (exit {proc.returncode}); see {run['dir'] / 'log.txt'} (recorded: "
                                      "delete its line from runs.jsonl to run it again)"), flush=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted; {finished} of {len(todo)} runs finished. The same command continues the sweep "
              "(unfinished runs restart)", file=sys.stderr)
        return 130
    finally:  # on Ctrl-C or an error: no run outlives the sweep
        for proc, (_, log, _) in running.items():
            proc.terminate()
            proc.wait()
            log.close()
    return 0


# ---------------------------------------------------------------------------------------------- the report
def load_runs(out: Path, missing_ok: bool = False) -> list[dict]:
    from skelemix.viz import read_metrics  # a torn last line (a sweep killed mid-write) is skipped

    path = out / "runs.jsonl"
    if not path.is_file():
        if missing_ok:
            return []
        raise SweepError(f"no runs in {out}: {path} does not exist")
    runs = read_metrics(path)
    for i, r in enumerate(runs, 1):
        if not (isinstance(r, dict) and isinstance(r.get("seed"), int) and isinstance(r.get("variant"), dict)):
            raise SweepError(f"{path}: record {i} lacks an integer seed and a variant object: {str(r)[:120]}")
    return runs


def _ok(record: dict) -> bool:
    return record.get("exit") == 0 and all(isinstance(record.get(k), (int, float))
                                           for k in ("linear_top1", "linear_top1_random_init"))


def escaped(record: dict, top1: float, gain: float) -> bool:
    return record["linear_top1"] >= top1 and record["linear_top1"] - record["linear_top1_random_init"] >= gain


def groups(out: Path, runs: list[dict]) -> list[tuple[dict, list[dict]]]:
    """(variant, its runs in seed order) in the order the sweep planned the variants."""
    order = list((read_state(out) or {}).get("variants", []))
    for r in runs:  # variants missing from sweep.json: in the order of their first record
        if r["variant"] not in order:
            order.append(r["variant"])
    by_key = {}
    for r in runs:  # the last record of a run wins
        by_key[run_key(r["seed"], r["variant"])] = r
    return [(v, sorted((r for r in by_key.values() if r["variant"] == v), key=lambda r: r["seed"])) for v in order
            if any(r["variant"] == v for r in by_key.values())]


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        return "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def _spread(low: float, high: float) -> str:
    return f"{low:.1f}-{high:.1f}"


def report(out: Path, top1: float, gain: float, markdown: bool = False) -> str:
    """The comparison tables of the sweep in ``out``; also draws ``out/sweep.png``."""
    grouped = groups(out, load_runs(out))
    if not grouped:
        raise SweepError(f"no runs in {out / 'runs.jsonl'}")
    rows, stats = [], []
    for variant, runs in grouped:
        ok = [r for r in runs if _ok(r)]
        acc = np.array([r["linear_top1"] for r in ok])
        esc = sum(escaped(r, top1, gain) for r in ok)
        stats.append((variant, acc, esc, len(ok)))
        rows.append([label(variant), str(len(ok)), str(len(runs) - len(ok)),
                     f"{esc}/{len(ok)} ({100 * esc / len(ok):.0f}%)" if ok else "-",
                     f"{np.median(acc):.1f}" if ok else "-",
                     _spread(*np.percentile(acc, [25, 75])) if ok else "-",
                     _spread(acc.min(), acc.max()) if ok else "-",
                     f"{np.median([r['linear_top1_random_init'] for r in ok]):.1f}" if ok else "-",
                     f"{np.median([r['wall_s'] for r in ok]):.0f}" if ok else "-"])
    text = [f"escape: linear top-1 >= {top1:g}% and >= {gain:g} points above the random-init encoder; top-1 in %", "",
            _table(["variant", "n", "failed", "escaped", "top-1 median", "IQR", "min-max", "random init median",
                    "wall s median"], rows, markdown)]
    pairs = []
    for (va, acc_a, esc_a, n_a), (vb, acc_b, esc_b, n_b) in itertools.combinations(stats, 2):
        u, p_mw = mann_whitney(acc_a.tolist(), acc_b.tolist())
        p_f = fisher_exact(esc_a, n_a - esc_a, esc_b, n_b - esc_b) if n_a and n_b else math.nan
        delta = np.median(acc_b) - np.median(acc_a) if n_a and n_b else math.nan
        pairs.append([label(va), label(vb), f"{esc_a}/{n_a} vs {esc_b}/{n_b}", f"{p_f:.3g}", f"{delta:+.1f}",
                      f"{u:g}", f"{p_mw:.3g}"])
    if pairs:
        text += ["", "two-sided exact tests: Fisher on the escape counts, Mann-Whitney U (of A) on top-1", "",
                 _table(["A", "B", "escaped", "Fisher p", "median B - A", "U", "Mann-Whitney p"], pairs, markdown)]
    plot(grouped, top1, gain, out / "sweep.png")
    return "\n".join(text) + f"\n\nplot: {out / 'sweep.png'}"


def plot(grouped: list, top1: float, gain: float, path: Path) -> Path:
    """One panel per variant: each seed's linear top-1, pretrained (green: escaped, red: not) above its random init."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from skelemix.plots import figure, save_figure

    colours = {True: "#2ca02c", False: "#d62728"}
    fig = figure(1.5 + 3.2 * len(grouped), 3.6)
    axes = fig.subplots(1, len(grouped), sharey=True, squeeze=False)[0]
    for ax, (variant, runs) in zip(axes, grouped):
        ok = [r for r in runs if _ok(r)]
        seeds, pre, rnd = ([r[k] for r in ok] for k in ("seed", "linear_top1", "linear_top1_random_init"))
        ax.vlines(seeds, rnd, pre, color="#bbbbbb", lw=1)
        ax.scatter(seeds, rnd, marker="o", facecolors="none", edgecolors="#777777")
        ax.scatter(seeds, pre, zorder=3, c=[colours[escaped(r, top1, gain)] for r in ok])
        ax.axhline(top1, ls="--", color="#555555", lw=1)
        ax.set_title(f"{label(variant)}\n{sum(escaped(r, top1, gain) for r in ok)}/{len(ok)} escaped", fontsize=9)
        ax.set_xlabel("seed")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylim(0, 100)
    axes[0].set_ylabel("linear top-1 (%)")
    dot = dict(marker="o", ls="none")
    fig.legend([Line2D([], [], color=colours[True], **dot), Line2D([], [], color=colours[False], **dot),
                Line2D([], [], mfc="none", mec="#777777", **dot), Line2D([], [], ls="--", color="#555555", lw=1)],
               ["pretrained, escaped", "pretrained, not escaped", "random init",
                f"escape: >= {top1:g}% and >= {gain:g} points above random init"],
               loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=8, frameon=False)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=20, help="number of seeds per variant (default 20)")
    p.add_argument("--first-seed", type=int, default=0, help="the seeds are first-seed ... first-seed + seeds - 1")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=V1[,V2...]",
                   help="a config override for every run, or with several values a variant axis (repeatable)")
    p.add_argument("--config", help="the trainer's --config (default: the demo)")
    p.add_argument("--out", help="sweep folder (default: runs/sweep/<config name>-<variant axes>)")
    p.add_argument("--jobs", type=int, help="runs at a time, one thread each (default: the number of cores)")
    p.add_argument("--report", metavar="DIR", help="only print the comparison of the sweep in DIR and redraw its PNG")
    p.add_argument("--markdown", action="store_true", help="print the tables in Markdown")
    p.add_argument("--escape-top1", type=float, default=70.0, help="escape: linear top-1 at least this (%%)")
    p.add_argument("--escape-gain", type=float, default=30.0,
                   help="escape: and at least this many points above the random-init encoder")
    args = p.parse_args(argv)
    for name, low in (("seeds", 1), ("jobs", 1), ("first_seed", 0)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')}: must be >= {low}; got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    thresholds = (args.escape_top1, args.escape_gain)
    try:
        if args.report:
            print(report(Path(args.report), *thresholds, args.markdown))
            return 0
        fixed, axes = parse_sets(args.sets)
        name = ([Path(args.config).stem] if args.config else []) + [f"{k}={','.join(v)}" for k, v in axes.items()]
        out = Path(args.out or Path("runs/sweep") / (_slug("-".join(name)) or "demo"))
        from skelemix.config import ConfigError, load_config

        for variant in variants(axes):  # every variant's config is valid before any run starts
            try:
                load_config(args.config, fixed + [f"{k}={v}" for k, v in variant.items()])
            except (ConfigError, FileNotFoundError) as err:
                raise SweepError(f"variant {label(variant)}: {err}" if variant else str(err)) from err
        todo = plan(out, args.config, fixed, axes, list(range(args.first_seed, args.first_seed + args.seeds)))
        total = args.seeds * len(variants(axes))
        jobs = args.jobs or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        print(f"sweep {out}: {len(todo)} of {total} runs to do ({total - len(todo)} recorded), {jobs} at a time",
              flush=True)
        status = sweep(todo, args.config, fixed, out, jobs)
        if status:
            return status
        print("\n" + report(out, *thresholds, args.markdown))
        return 0
    except (ValueError, OSError) as err:  # SweepError, ConfigError, a malformed JSON line, a folder not writable
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
