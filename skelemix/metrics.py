"""What a training run records: ``metrics.jsonl`` (one JSON object a line) and TensorBoard events.

Every record has a ``kind`` (``step``, ``epoch``, ``knn``, ``linear``) and the ``global_step`` after which it
was written, which is how a resumed run drops the records of the steps it redoes.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def read_metrics(metrics_path: str | Path) -> list[dict]:
    """The records of a trainer's ``metrics.jsonl``. A torn last line (a run killed while writing it) is dropped
    with a note; any other line that is not a JSON object is an error naming the file and the line."""
    path = Path(metrics_path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                print(f"note: {path}:{i + 1}: dropped a torn last record (the run stopped while writing it)",
                      file=sys.stderr)
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON record: {err}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def append_record(path: str | Path, record: dict) -> None:
    """Add one record to the end of a ``metrics.jsonl``."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def keep_records_until(path: str | Path, global_step: int) -> None:
    """Drop the records written after ``global_step``: those of steps a resumed run does again."""
    path = Path(path)
    if not path.exists():
        return
    records = read_metrics(path)
    if not all(isinstance(r.get("global_step", 0), int) for r in records):
        raise ValueError(f"{path}: a record's global_step is not an integer; move the file away to resume")
    path.write_text("".join(json.dumps(r) + "\n" for r in records if r.get("global_step", 0) <= global_step))


class MetricsLog:
    """The ``metrics.jsonl`` and TensorBoard events (``tb/``) of a run in ``out``; only rank 0 writes (on the
    other ranks every call does nothing)."""

    def __init__(self, out: str | Path, writer: bool):
        self.path, self.writer, self.tb = Path(out) / "metrics.jsonl", writer, None

    def open(self, new_run: bool) -> None:
        """Start writing; a new run (not a resumed one) starts the file anew, saying so when it held records."""
        if not self.writer:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if new_run and self.path.is_file() and self.path.stat().st_size:
            print(f"note: {self.path} held the records of an earlier run in this folder; this run starts it anew "
                  "(--resume continues a run instead)", file=sys.stderr, flush=True)
            self.path.write_text("")
        self.tb = _summary_writer(self.path.parent / "tb")

    def write(self, record: dict) -> None:
        """One record; its numbers (besides the counters) also go to TensorBoard as ``kind/key``."""
        if not self.writer:
            return
        append_record(self.path, record)
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("kind", "epoch", "global_step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{record['kind']}/{key}", value, record.get("global_step", 0))

    def end_epoch(self, epoch: int, epochs: int, global_step: int, lr: float, means: dict, seconds: float,
                  knn: dict | None) -> str:
        """Record an epoch's summary (the means of the logged values, the lr, its seconds) and its kNN monitor;
        returns the line printed for it."""
        self.write({"kind": "epoch", "epoch": epoch, "global_step": global_step, "lr": lr, **means, "seconds": seconds})
        part = {k: means.get(k, math.nan) for k in ("loss", "loss_ins", "loss_p", "loss_c")}
        line = (f"epoch {epoch}/{epochs}  loss {part['loss']:.4f}  (ins {part['loss_ins']:.3f}, p "
                f"{part['loss_p']:.3f}, c {part['loss_c']:.3f})  lr {lr:g}  {seconds:.1f}s")
        if knn is None:
            return line
        self.write({"kind": "knn", "epoch": epoch, "global_step": global_step, **knn})
        return line + "  kNN " + " ".join(f"{k}={v:.1f}%" for k, v in knn.items())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _summary_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("note: tensorboard is not installed; no TensorBoard events are written", file=sys.stderr)
        return None
    return SummaryWriter(str(path))
