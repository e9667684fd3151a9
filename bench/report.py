"""Render the JSON that ``pytest bench/`` saves into Markdown tables and a bar chart.

    python -m bench.report .benchmarks/skelemix-latest.json [--markdown OUT.md] [--png OUT.png]

Each group gets one row per provider: median, min, GB/s, TFLOP/s, and the speed-up over ``eager`` (and over
``compile``) of the same run. Groups that carry their FLOPs and bytes also get the physical floor of that
work on the machine, ``max(flops / matmul peak, bytes / copy bandwidth)``, with the measured peaks from the
``machine`` group (bench_machine.py), and each provider's distance from it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ORDER = ("eager", "compile", "cpp", "cuda", "triton", "cuda+bf16", "triton+bf16")
BASELINES = ("eager", "official-style")  # what "vs eager" divides by, first found


def _peaks(results: list[dict]) -> tuple[float | None, float | None]:
    """(copy bytes/s, matmul FLOP/s) measured on this machine, if the machine group ran."""
    bw = flops = None
    for r in results:
        if r["group"] == "machine/copy":
            bw = max(bw or 0.0, r["bytes"] / r["median_s"])
        elif r["group"].startswith("machine/matmul"):
            flops = max(flops or 0.0, r["flops"] / r["median_s"])
    return bw, flops


def floor_seconds(r: dict, bw: float | None, peak: float | None) -> float | None:
    parts = [r["bytes"] / bw if bw and r.get("bytes") else 0.0, r["flops"] / peak if peak and r.get("flops") else 0.0]
    return max(parts) or None


def format_tables(payload: dict) -> str:
    env, results = payload["environment"], payload["results"]
    bw, peak = _peaks(results)
    lines = [f"Device: {env['device']}; torch {env['torch']}, CUDA {env['cuda']}, Triton {env['triton']}, "
             f"sizes '{env['size']}', {env['rounds']} timed rounds (median)."]
    if bw or peak:
        lines.append(f"Measured peaks: copy {bw / 1e9:.1f} GB/s, matmul {peak / 1e12:.2f} TFLOP/s."
                     if bw and peak else f"Measured peaks: copy {bw or 0:.3g} B/s, matmul {peak or 0:.3g} FLOP/s.")
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    for group, rows in groups.items():
        rows.sort(key=lambda r: ORDER.index(r["provider"]) if r["provider"] in ORDER else len(ORDER))
        base = {r["provider"]: r["median_s"] for r in rows}
        base["eager"] = next((base[b] for b in BASELINES if b in base), None)
        shapes = ", ".join(f"{k}={v}" for k, v in rows[0]["shapes"].items())
        lines += ["", f"**{group}** ({rows[0]['dtype']}; {shapes})", "",
                  "| provider | median ms | min ms | GB/s | TFLOP/s | vs eager | vs compile | vs floor |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            t = r["median_s"]
            floor = floor_seconds(r, bw, peak) if not group.startswith("machine/") else None
            cells = [r["provider"], f"{t * 1e3:.3f}", f"{r['min_s'] * 1e3:.3f}",
                     f"{r['bytes'] / t / 1e9:.1f}" if r.get("bytes") else "",
                     f"{r['flops'] / t / 1e12:.3f}" if r.get("flops") else "",
                     f"{base['eager'] / t:.2f}x" if base["eager"] else "",
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
        if not r["group"].startswith("machine/"):
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
