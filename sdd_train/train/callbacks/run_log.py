"""The run log: every record to its ``<stream>.jsonl`` in the run directory, to Weights & Biases, and
(metrics and validation) as a console line, with a progress bar on a terminal.

Only rank 0 writes; every value it writes is already global (reduced over ranks by its producer).
"""

from __future__ import annotations

import json
import math
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdd_train.checkpoint import write_atomic
from sdd_train.config import ConfigError, LoggingConfig, RunConfig, as_dict
from sdd_train.distributed.world import World
from sdd_train.train.callbacks.base import Callback

if TYPE_CHECKING:
    from sdd_train.train.train_module import StepOutput
    from sdd_train.train.trainer import Trainer


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
        write_atomic(self.path, "".join(k + "\n" for k in kept))  # a kill here keeps the old log

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class RunLog:
    """Rank 0's record streams in the run directory, mirrored to W&B.

    ``metrics`` (train / val records, also printed), ``layer_stats`` (per-layer norms),
    ``activations`` (residual RMS and layer similarity), ``moe`` (expert load shares) and ``events``
    (loss spikes, rollbacks).
    A resumed run drops every record after its checkpoint; a rollback does the same except for
    ``events``, which keeps the history of what happened.
    """

    STREAMS = ("metrics", "layer_stats", "activations", "moe", "events")

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
    # downstream tasks: each one's primary metric (the record's bare ``downstream/<task>`` keys)
    parts += [f"{key[len('downstream/'):]} {value:.3f}" for key, value in record.items()
              if key.startswith("downstream/") and key.count("/") == 1]
    return " | ".join(parts)


def _progress_bar(cfg: RunConfig, world: World, initial: int):
    """A tqdm bar on rank 0 when stdout is a terminal (log lines then print above it)."""
    if not (cfg.logging.progress_bar and world.is_main and sys.stdout.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.train.max_steps, initial=initial, unit="step", dynamic_ncols=True, leave=False)


class RunLogCallback(Callback):
    name = "run_log"
    priority = 10

    def __init__(self) -> None:
        self.out: RunLog | None = None
        self.bar = None

    def on_fit_start(self, trainer: Trainer) -> None:
        cfg, world = trainer.cfg, trainer.world
        self.bar = _progress_bar(cfg, world, trainer.step)
        if not world.is_main:
            return
        wandb = (WandbLog(cfg.logging, trainer.run_dir, cfg.name, as_dict(cfg)) if cfg.logging.wandb != "disabled"
                 else None)
        self.out = RunLog(trainer.run_dir, trainer.step, wandb, self.bar.write if self.bar is not None else trainer.log)

    def on_record(self, trainer: Trainer, stream: str, record: dict[str, Any], console: bool,
                  wandb_record: dict[str, Any] | None) -> None:
        if self.out is not None:
            line = format_line(record, trainer.cfg.train.max_steps) if console else None
            self.out.write(stream, record, line, wandb_record)

    def post_train_step(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_rollback(self, trainer: Trainer, step: int) -> None:
        if self.out is not None:
            self.out.rollback(step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def close(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.out is not None:
            self.out.close()
