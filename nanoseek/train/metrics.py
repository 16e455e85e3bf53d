"""Run observability shared by every training recipe: `metrics.jsonl` (one JSON object per step) and PNG plots.

The log is append-only and flushed every line, so a killed run keeps everything up to its last step. A resumed
run first drops the lines past the checkpoint it resumes from (they will be recomputed), so the file always
reads as one run: one line per step, steps increasing.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

METRICS_NAME = "metrics.jsonl"


def _clean(value):
    """JSON has no inf/nan: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every record of a metrics.jsonl; a torn last line (the process died mid-write) is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


class MetricsLog:
    """Appends records to run_dir/metrics.jsonl. Only the writing process (rank 0) passes enabled=True.

    resume_step None starts a fresh file; an int keeps the records with step <= resume_step and drops the rest.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_NAME
        self.enabled = enabled
        self._f = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [] if resume_step is None else [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)   # the kept history is never half-rewritten
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def plot_curves(records: Sequence[dict], keys: Iterable[str], path: str | os.PathLike, title: str,
                ylabel: str = "", logy: bool = False) -> Path | None:
    """One PNG with a line per key against `step`. A key whose values are lists (one per MoE layer) gives one
    line per element. Returns the path, or None when no record has any of the keys."""
    import matplotlib

    matplotlib.use("Agg")          # no display: runs on servers and under torchrun
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list, list]] = {}
    for r in records:
        for key in keys:
            v = r.get(key)
            if v is None or "step" not in r:
                continue
            for i, x in enumerate(v) if isinstance(v, list) else [(None, v)]:
                if x is None:
                    continue
                name = key if i is None else f"{key} {i}"
                series.setdefault(name, ([], []))
                series[name][0].append(r["step"])
                series[name][1].append(x)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100, layout="constrained")
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) <= 16:
        ax.legend(fontsize=7)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
