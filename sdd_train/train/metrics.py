"""``metrics.jsonl`` (one JSON object per record) and the console log line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        if resume_step > 0 and self.path.is_file():
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()

    def _truncate_after(self, step: int) -> None:
        """Drop records written after the checkpoint we resume from: they will be produced again."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def format_line(record: dict[str, Any], max_steps: int) -> str:
    parts = [f"step {record['step']:>{len(str(max_steps))}}/{max_steps}"]
    for key, fmt in (("loss", "{:.4f}"), ("val_loss", "{:.4f}"), ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"),
                     ("tokens_per_sec", "{:,.0f} tok/s"), ("step_time", "{:.3f} s/step")):
        if key in record and record[key] is not None and not (isinstance(record[key], float) and math.isnan(record[key])):
            label = "" if key in ("tokens_per_sec", "step_time") else f"{key} "
            parts.append(label + fmt.format(record[key]))
    return " | ".join(parts)
