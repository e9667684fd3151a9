"""Render the JSON that ``pytest bench/`` saves into Markdown tables and a bar chart.

    python -m bench.report .benchmarks/skelemix-latest.json [--markdown OUT.md] [--png OUT.png]

The SkeleMixCLR+ step matrix (bench_model.py) comes first, one row per combination of impl, epilogue, amp,
CUDA graph and layout: step time, samples/s, the ratio to the official-style step (bench/official_style.py),
to the eager and to the compile baseline (all float32, plain modules, no graph, contiguous), peak GPU memory
and the distance from the floor. Then each other group gets one row per
provider: median, min, GB/s, TFLOP/s, and the speed-up over ``eager`` (and over ``official-style`` and
``compile`` where they ran) of the same run.
Groups that carry their FLOPs and bytes also get the physical floor of that work on the machine,
``max(flops / matmul peak, bytes / copy bandwidth)``, with the measured peaks from the ``machine`` group
(bench_machine.py; the matmul peak of the row's dtype), and each provider's distance from it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ORDER = ("official-style", "eager", "compile", "cpp", "cuda", "triton", "cuda+bf16", "triton+bf16")
BASELINES = ("eager", "official-style")  # what "vs eager" divides by, first found


def _peaks(results: list[dict]) -> tuple[float | None, dict[str, float]]:
    """(copy bytes/s, {dtype: matmul FLOP/s}) measured on this machine, if the machine group ran."""
    bw, flops = None, {}
    for r in results:
        if "median_s" not in r:
            continue
        if r["group"] == "machine/copy":
            bw = max(bw or 0.0, r["bytes"] / r["median_s"])
        elif r["group"].startswith("machine/matmul-"):
            dtype = r["group"].removeprefix("machine/matmul-")
            flops[dtype] = max(flops.get(dtype, 0.0), r["flops"] / r["median_s"])
    return bw, flops


def floor_seconds(r: dict, bw: float | None, peaks: dict[str, float]) -> float | None:
    """The floor of row ``r``: its bytes at the copy bandwidth or its FLOPs at the matmul rate of its dtype
    (float32's where that dtype was not measured), whichever takes longer."""
    peak = peaks.get(r.get("dtype", "float32")) or peaks.get("float32")
    parts = [r["bytes"] / bw if bw and r.get("bytes") else 0.0, r["flops"] / peak if peak and r.get("flops") else 0.0]
    return max(parts) or None


STEP_GROUP = "model/SkeleMixCLR+ step"


def format_steps(payload: dict) -> str:
    """The step matrix as one Markdown table (rows in the order they ran; failed rows say what broke)."""
    env = payload["environment"]
    rows = [r for r in payload["results"] if r["group"] == STEP_GROUP and "variant" in r]
    if not rows:
        return ""
    bw, peaks = _peaks(payload["results"])

    def baseline(impl):
        plain = dict(impl=impl, epilogue="modules", amp="none", graph="off", layout="contiguous")
        return next((r["median_s"] for r in rows if "median_s" in r and {"layout": "contiguous", **r["variant"]}
                     == plain), None)

    official, eager, compiled = baseline("official-style"), baseline("eager"), baseline("compile")
    shapes = next((r["shapes"] for r in rows if "shapes" in r), {})
    batch = shapes.get("x", [0])[0]
    lines = [f"**SkeleMixCLR+ training step** on {env['device']} (torch {env['torch']}, sizes '{env['size']}': "
             f"x={shapes.get('x')}, mixes={shapes.get('mixes')}, queue={shapes.get('queue')}; median of "
             f"{env['rounds']} rounds; baselines: official-style, eager and compile with float32, modules, no graph)",
             "", "| impl | epilogue | amp | CUDA graph | layout | step ms | samples/s | vs official-style | vs eager "
             "| vs compile | peak GiB | vs floor |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        v = r["variant"]
        cells = [v["impl"], v["epilogue"], v["amp"], v["graph"], v.get("layout", "contiguous")]
        if "error" in r:
            lines.append("| " + " | ".join(cells + [f"failed: {r['error']}"] + [""] * 6) + " |")
            continue
        t = r["median_s"]
        floor = floor_seconds(r, bw, peaks)
        cells += [f"{t * 1e3:.1f}", f"{batch / t:.0f}", f"{official / t:.2f}x" if official else "",
                  f"{eager / t:.2f}x" if eager else "",
                  f"{compiled / t:.2f}x" if compiled else "",
                  f"{r['peak_bytes'] / 2**30:.2f}" if r.get("peak_bytes") else "",
                  f"{t / floor:.1f}x floor" if floor else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_steps(path: Path, payload: dict) -> None:
    """Rewrite the step matrix table at ``path`` (after every row: a run cut short keeps what it measured)."""
    text = format_steps(payload)
    if text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)


def format_tables(payload: dict) -> str:
    env = payload["environment"]
    results = [r for r in payload["results"] if "median_s" in r]
    bw, peaks = _peaks(results)
    lines = [f"Device: {env['device']}; torch {env['torch']}, CUDA {env['cuda']}, Triton {env['triton']}, "
             f"sizes '{env['size']}', {env['rounds']} timed rounds (median)."]
    if bw or peaks:
        lines.append("Measured peaks: " + ", ".join(
            ([f"copy {bw / 1e9:.1f} GB/s"] if bw else [])
            + [f"{dtype} matmul {rate / 1e12:.2f} TFLOP/s" for dtype, rate in peaks.items()]) + ".")
    steps = format_steps(payload)
    if steps:
        lines += ["", steps]
    groups: dict[str, list[dict]] = {}
    for r in results:
        if not (r["group"] == STEP_GROUP and "variant" in r):
            groups.setdefault(r["group"], []).append(r)
    for group, rows in groups.items():
        rows.sort(key=lambda r: ORDER.index(r["provider"]) if r["provider"] in ORDER else len(ORDER))
        base = {r["provider"]: r["median_s"] for r in rows}
        base["eager"] = next((base[b] for b in BASELINES if b in base), None)
        official = base.get("official-style") if base["eager"] != base.get("official-style") else None
        shapes = ", ".join(f"{k}={v}" for k, v in rows[0]["shapes"].items())
        lines += ["", f"**{group}** ({rows[0]['dtype']}; {shapes})", "",
                  "| provider | median ms | min ms | GB/s | TFLOP/s | " + ("vs official-style | " if official else "")
                  + "vs eager | vs compile | vs floor |", "|---|---:|---:|---:|---:|" + ("---:|" if official else "")
                  + "---:|---:|---:|"]
        for r in rows:
            t = r["median_s"]
            floor = floor_seconds(r, bw, peaks) if not group.startswith("machine/") else None
            cells = [r["provider"], f"{t * 1e3:.3f}", f"{r['min_s'] * 1e3:.3f}",
                     f"{r['bytes'] / t / 1e9:.1f}" if r.get("bytes") else "",
                     f"{r['flops'] / t / 1e12:.3f}" if r.get("flops") else ""]
            cells += [f"{official / t:.2f}x"] if official else []
            cells += [f"{base['eager'] / t:.2f}x" if base["eager"] else "",
                     f"{base['compile'] / t:.2f}x" if "compile" in base else "",
                     f"{t / floor:.1f}x floor" if floor else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, dict[str, float]] = {}
    for r in payload["results"]:
        if "median_s" in r and not r["group"].startswith("machine/"):
            groups.setdefault(r["group"], {})[r["provider"]] = r["median_s"]
    groups = {g: {**v, "eager": next(v[b] for b in BASELINES if b in v)} for g, v in groups.items()
              if any(b in v for b in BASELINES)}
    providers = [p for p in ORDER if any(p in v for v in groups.values())]
    providers += sorted({p for v in groups.values() for p in v} - set(providers) - set(BASELINES))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        xs = [j + i * width for j, v in enumerate(groups.values()) if p in v]
        ys = [v["eager"] / v[p] for v in groups.values() if p in v]
        ax.bar(xs, ys, width, label=p)
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels(list(groups), rotation=30, ha="right", fontsize=8)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_ylabel("speed-up over eager")
    ax.set_title(payload["environment"]["device"], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, help="results saved by `pytest bench/`")
    p.add_argument("--markdown", type=Path, help="also write the tables here")
    p.add_argument("--png", type=Path, help="bar chart of the speed-ups over eager")
    args = p.parse_args(argv)
    payload = json.loads(args.json.read_text())
    text = format_tables(payload)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.png:
        plot(payload, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
