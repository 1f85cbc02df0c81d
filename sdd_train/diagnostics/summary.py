"""Summaries of finished (or running) runs: final losses, divergence, gradient norms, throughput,
spikes, and the results table of a sweep directory (``sweep.json`` plus its runs)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from sdd_train.exit_codes import EXIT_DIVERGED

# A sweep launcher writes each run's exit code here (the run's own files cannot say it was killed).
EXIT_FILE = "exit_code"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a run's jsonl file; [] when the run has not written it (yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summarise(run_dir: str | Path, diverge_loss: float | None = None) -> dict[str, Any]:
    """Final losses, divergence (and its step), max grad norm, tokens/s and spike count of one run."""
    run_dir = Path(run_dir)
    records = read_records(run_dir / "metrics.jsonl")
    events = read_records(run_dir / "events.jsonl")
    exit_file = run_dir / EXIT_FILE
    code = int(exit_file.read_text()) if exit_file.is_file() else None
    train = [r for r in records if "loss" in r]
    good = [r for r in train if _finite(r["loss"]) and not r.get("skipped")]
    val = [r for r in records if "val_loss" in r]
    tail = good[-5:]
    bad = [e["step"] for e in events if e.get("event") == "nonfinite"]
    bad += [r["step"] for r in train if not (_finite(r["loss"]) and _finite(r.get("grad_norm", 0.0)))]
    diverged_at = min(bad) if bad else None
    if diverged_at is None and code == EXIT_DIVERGED:
        diverged_at = (train[-1]["step"] + 1) if train else 1
    final_loss = sum(r["loss"] for r in tail) / len(tail) if tail else math.nan
    if diverged_at is None and diverge_loss is not None and good and final_loss > diverge_loss:
        above = len(good)  # the run stayed above the threshold from this logged record to the end
        while above > 0 and good[above - 1]["loss"] > diverge_loss:
            above -= 1
        diverged_at = good[above]["step"] if above < len(good) else good[-1]["step"]
    rates = [r["tokens_per_sec"] for r in good[1:] if "tokens_per_sec" in r]  # the first includes warm-up
    return {
        "exit": code,
        "steps": train[-1]["step"] if train else 0,
        "final_loss": final_loss,
        "val_loss": val[-1]["val_loss"] if val else math.nan,
        "diverged": diverged_at is not None,
        "diverged_at": diverged_at,
        "max_grad_norm": max((g for r in train + events for g in (r.get("grad_norm"), r.get("grad_norm_max"))
                              if _finite(g)), default=math.nan),
        "tokens_per_sec": sorted(rates)[len(rates) // 2] if rates else math.nan,
        "spikes": sum(1 for e in events if e.get("event") == "loss_spike"),
    }


def results(manifest_dir: str | Path) -> list[dict[str, Any]]:
    """One row per run of a sweep directory (its ``sweep.json``): axis labels + :func:`summarise`."""
    manifest = json.loads((Path(manifest_dir) / "sweep.json").read_text())
    return [{"run": r["name"], **r["labels"], **summarise(r["run_dir"], manifest.get("diverge_loss"))}
            for r in manifest["runs"]]


def format_cell(value: Any) -> str:
    """A table cell: yes/no, - for missing, thousands separators for big numbers, 4 digits otherwise."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def write_table(manifest_dir: str | Path) -> tuple[Path, Path]:
    """``results.md`` and ``results.csv`` in the sweep directory; returns their paths."""
    out = Path(manifest_dir)
    rows = results(out)
    columns = list(rows[0])
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(format_cell(r[c]) for c in columns) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    (out / "results.csv").write_text(buffer.getvalue())
    return out / "results.md", out / "results.csv"
