"""What an evaluation writes and reports: ``results.json``, ``scores.npy`` (val softmax scores), ``labels.npy``
and its pictures in one folder; the two protocols of a trained probe; and the ensemble of saved evaluations.

Two protocols are reported side by side for the trained probes. The paper's number is the best test top-1
over the periodic evaluations, i.e. model selection on the test set (docs/DESIGN.md 8, quirk 15); the clean
number is the top-1 after the last epoch.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from .probe import topk_accuracy

PAPER = "best test top-1 over the periodic evaluations (model selection on the test set, as the paper reports)"
CLEAN = "top-1 after the last epoch"


def protocols(history: list[dict]) -> dict:
    """The paper's number (best test top-1 over the periodic evaluations) and the clean one (last epoch)."""
    best = max(history, key=lambda h: h["top1"])  # the first of equals, as a running max keeps it
    last = history[-1]
    return {"paper": {"description": PAPER, "top1": best["top1"], "top5": best["top5"], "epoch": best["epoch"]},
            "clean": {"description": CLEAN, "top1": last["top1"], "top5": last["top5"], "epoch": last["epoch"]}}


def print_protocols(p: dict) -> None:
    print(f"  {'protocol':<64}  {'top-1':>6}  {'top-5':>6}")
    print(f"  {'paper: best test top-1 over the evaluations (epoch ' + str(p['paper']['epoch']) + ')':<64}  "
          f"{p['paper']['top1']:6.2f}  {p['paper']['top5']:6.2f}")
    print(f"  {'clean: top-1 after the last epoch (' + str(p['clean']['epoch']) + ')':<64}  "
          f"{p['clean']['top1']:6.2f}  {p['clean']['top5']:6.2f}")


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` counts, rows the true class, columns the predicted one."""
    return np.bincount(np.asarray(labels) * num_classes + np.asarray(preds),
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion_plot(labels: np.ndarray, scores: np.ndarray, classes: list[str], title: str):
    """A drawer of ``confusion.png`` for :func:`write_results` (the title gets the top-1)."""
    def draw(path: Path):
        from .viz import plot_confusion

        preds = scores.argmax(1)
        plot_confusion(confusion_matrix(labels, preds, scores.shape[1]), classes, path,
                       title=f"{title}: top-1 {100 * (preds == labels).mean():.1f}%")
    return draw


def write_results(out: Path, result: dict, scores: np.ndarray, labels: np.ndarray, written=(), plots=None,
                  start: float | None = None) -> dict:
    """Every evaluation's outputs in ``out``: ``scores.npy`` (float32), ``labels.npy`` (int64), the pictures of
    ``plots`` (name -> draw(path)), and ``results.json``, whose ``files`` lists them with the files the caller
    already ``written`` there; ``elapsed_s`` counts from ``start``. Returns ``result`` with ``out``."""
    np.save(out / "scores.npy", np.asarray(scores, dtype=np.float32))
    np.save(out / "labels.npy", np.asarray(labels).astype(np.int64))
    if start is not None:
        result["elapsed_s"] = round(time.perf_counter() - start, 2)
    result["files"] = ["results.json", "scores.npy", "labels.npy", *written]
    for name, draw in (plots or {}).items():
        draw(out / name)
        result["files"].append(name)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    took = f" ({result['elapsed_s']:.0f}s)" if start is not None else ""
    print(f"wrote {', '.join(result['files'])} in {out}{took}", flush=True)
    result["out"] = str(out)
    return result


# -------------------------------------------------------------------------------------------- ensemble
def _read_stream(folder: Path) -> dict:
    if not folder.is_dir():
        raise FileNotFoundError(f"result folder not found: {folder}")
    for name in ("scores.npy", "labels.npy"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not an evaluation output folder: {name} is missing (run "
                                    "`python -m skelemix.evaluate linear|knn|finetune|semi --out DIR` first)")
    info = json.loads((folder / "results.json").read_text()) if (folder / "results.json").is_file() else {}
    return {"dir": folder, "scores": np.load(folder / "scores.npy"), "labels": np.load(folder / "labels.npy"),
            "info": info}


def _check_streams(streams: list[dict]) -> None:
    """The same val labels in the same order, and scores for the same classes, in every stream."""
    ref = streams[0]
    for s in streams[1:]:
        if s["labels"].shape != ref["labels"].shape:
            raise ValueError(f"the label arrays differ: {ref['dir']} has {len(ref['labels'])} val samples and "
                             f"{s['dir']} {len(s['labels'])}; the streams must be evaluated on the same val split")
        if not np.array_equal(s["labels"], ref["labels"]):
            n = int((s["labels"] != ref["labels"]).sum())
            raise ValueError(f"the label arrays differ: {s['dir']} disagrees with {ref['dir']} on {n} of "
                             f"{len(ref['labels'])} samples; the streams must be evaluated on the same val split "
                             "in the same order")
    for s in streams:
        if s["scores"].ndim != 2 or len(s["scores"]) != len(ref["labels"]):
            raise ValueError(f"{s['dir']}/scores.npy has shape {s['scores'].shape}; expected ({len(ref['labels'])}, "
                             "num_classes)")
        if s["scores"].shape[1] != ref["scores"].shape[1]:
            raise ValueError(f"mismatched num_classes: {ref['dir']} has scores for {ref['scores'].shape[1]} classes "
                             f"and {s['dir']} for {s['scores'].shape[1]}")


def ensemble(dirs: list[str | os.PathLike], out: str | os.PathLike | None = None, plots: bool = True) -> dict:
    """Average the softmax scores saved by several evaluations (e.g. the joint, motion and bone streams) and
    report top-1/top-5 of every stream and of the ensemble. The label arrays must be identical."""
    if not dirs:
        raise ValueError("ensemble needs at least one result folder")
    streams = [_read_stream(Path(d)) for d in dirs]
    _check_streams(streams)
    ref, labels = streams[0], torch.from_numpy(streams[0]["labels"])
    rows = []
    for s in streams:
        top = topk_accuracy(torch.from_numpy(s["scores"]), labels)
        rows.append({"dir": str(s["dir"]), "mode": s["info"].get("mode"), "view": s["info"].get("view"),
                     "top1": top[1], "top5": top[5]})
    mean = np.mean([s["scores"].astype(np.float64) for s in streams], axis=0).astype(np.float32)
    top = topk_accuracy(torch.from_numpy(mean), labels)
    result = {"mode": "ensemble", "streams": rows, "ensemble": {"top1": top[1], "top5": top[5]},
              "num_classes": int(mean.shape[1]), "val_samples": len(labels), "classes": ref["info"].get("classes")}
    out = Path(out) if out is not None else \
        Path(os.path.commonpath([str(s["dir"].resolve().parent) for s in streams])) / "eval_ensemble"
    out.mkdir(parents=True, exist_ok=True)
    width = max(len("ensemble"), *(len(r["dir"]) for r in rows))
    print(f"ensemble of {len(rows)} streams (mean of softmax scores) on {len(labels)} val samples")
    print(f"  {'stream':<{width}}  {'view':<6}  {'top-1':>6}  {'top-5':>6}")
    for r in rows:
        print(f"  {r['dir']:<{width}}  {str(r['view'] or '-'):<6}  {r['top1']:6.2f}  {r['top5']:6.2f}")
    print(f"  {'ensemble':<{width}}  {'':<6}  {top[1]:6.2f}  {top[5]:6.2f}")
    classes = result["classes"] or [str(c) for c in range(mean.shape[1])]
    drawings = {"confusion.png": confusion_plot(ref["labels"], mean, classes, f"ensemble of {len(rows)} streams")}
    return write_results(out, result, mean, ref["labels"], plots=drawings if plots else None)
