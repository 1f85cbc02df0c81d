"""Where metrics go: ``metrics.jsonl`` (one JSON object per record), Weights & Biases, the console line.

Only rank 0 writes; every value it writes is already global (reduced over ranks by the trainer).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdd_train.config import ConfigError, LoggingConfig


class MetricsLog:
    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        if resume_step > 0 and self.path.is_file():
            self.truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()

    def truncate_after(self, step: int) -> None:
        """Drop records written after the checkpoint we resume from: they will be produced again."""
        if not self.path.is_file():
            return
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


class RunLog:
    """Rank 0's record streams in the run directory, mirrored to W&B.

    ``metrics`` (train / val records, also printed), ``layer_stats`` (per-layer norms),
    ``activations`` (residual RMS and layer similarity) and ``events`` (loss spikes, rollbacks).
    A resumed run drops every record after its checkpoint; a rollback does the same except for
    ``events``, which keeps the history of what happened.
    """

    STREAMS = ("metrics", "layer_stats", "activations", "events")

    def __init__(self, run_dir: Path, resume_step: int, wandb: WandbLog | None, say: Callable[[str], None]):
        self.logs = {name: MetricsLog(Path(run_dir) / f"{name}.jsonl", resume_step) for name in self.STREAMS}
        self.wandb, self.say = wandb, say

    def write(self, stream: str, record: dict[str, Any], line: str | None = None,
              wandb_record: dict[str, Any] | None = None) -> None:
        """Append ``record`` to ``stream``; print ``line`` if given; W&B gets ``wandb_record`` or the record."""
        self.logs[stream].write(record)
        if self.wandb is not None:
            self.wandb.write(record if wandb_record is None else wandb_record)
        if line is not None:
            self.say(line)

    def rollback(self, step: int) -> None:
        for name, log in self.logs.items():
            if name != "events":
                log.truncate_after(step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.close()


def import_wandb(mode: str):
    """The wandb module, or a ConfigError naming the fix when logging.wandb asks for it and it is missing."""
    try:
        import wandb  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError(f"logging.wandb: '{mode}' needs the wandb package (pip install wandb),"
                          " or set logging.wandb=disabled") from None
    return wandb


class WandbLog:
    """Weights & Biases sink; ``offline`` needs no network (``wandb sync RUN/wandb/offline-run-*`` later).

    The W&B run id is kept in the run directory so a resumed run continues the same W&B run.
    """

    def __init__(self, cfg: LoggingConfig, run_dir: Path, name: str, config: dict[str, Any]):
        wandb = import_wandb(cfg.wandb)
        id_file = Path(run_dir) / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, group=cfg.wandb_group, name=name,
                              id=run_id, resume="allow", mode=cfg.wandb, dir=str(run_dir), config=config)

    def write(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# (record key, how it reads on the console line), in display order
_CONSOLE: tuple[tuple[str, Callable[[Any], str]], ...] = (
    ("loss", "loss {:.4f}".format),
    ("val_loss", "val_loss {:.4f}".format),
    ("lr", "lr {:.2e}".format),
    ("grad_norm", "grad_norm {:.3f}".format),
    ("tokens_per_sec", "{:,.0f} tok/s".format),
    ("step_time", "{:.3f} s/step".format),
    ("mfu", "MFU {:.1%}".format),
    ("peak_mem_gib", "peak mem {:.2f} GiB".format),
    ("skipped_steps", "skipped {}".format),
    ("eta_s", lambda s: f"ETA {_duration(s)}"),
)


def format_line(record: dict[str, Any], max_steps: int) -> str:
    parts = [f"step {record['step']:>{len(str(max_steps))}}/{max_steps}"]
    for key, fmt in _CONSOLE:
        value = record.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            parts.append(fmt(value))
    return " | ".join(parts)
