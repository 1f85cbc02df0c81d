"""A profiler trace of a few steps (``train.profile``): where a step's time goes, per phase and kernel.

The loop names its phases with ``record_function`` (data, forward, backward, optimizer, checkpoint;
sdd_train/train/train_module.py), so the trace shows them as spans over the operators they ran. The
profiler runs only for ``wait + warmup + steps`` steps of this process and is stopped afterwards: the
rest of the run pays nothing. On CUDA, ``memory_snapshot`` also records the allocator's history from
the start of the run to the end of the traced steps (torch.cuda.memory's snapshot, for
pytorch.org/memory_viz).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdd_train.config import ProfileConfig
from sdd_train.train.callbacks.base import Callback

if TYPE_CHECKING:
    from sdd_train.train.trainer import Trainer


class ProfilerCallback(Callback):
    name = "profiler"
    priority = 5  # last of the built-in ones: a step's evaluation and checkpoint fall inside its trace

    def __init__(self, cfg: ProfileConfig):
        self.cfg = cfg
        self.profiler: torch.profiler.profile | None = None
        self.steps_seen = 0
        self.out: Path | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        cuda = trainer.world.device.type == "cuda"
        self.out = trainer.run_dir / "profile"
        self.out.mkdir(parents=True, exist_ok=True)
        rank = trainer.world.rank
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.profiler = profile(activities=activities, schedule=schedule(wait=self.cfg.wait, warmup=self.cfg.warmup,
                                                                         active=self.cfg.steps, repeat=1),
                                on_trace_ready=lambda p: self._write(p, trainer, rank))
        self.profiler.start()
        if cuda and self.cfg.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def _write(self, prof: torch.profiler.profile, trainer: Trainer, rank: int) -> None:
        path = self.out / f"trace_rank{rank}.json"
        prof.export_chrome_trace(str(path))
        if trainer.world.device.type == "cuda" and self.cfg.memory_snapshot:
            torch.cuda.memory._dump_snapshot(str(self.out / f"memory_rank{rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        traced = min(self.cfg.steps, self.steps_seen - self.cfg.wait - self.cfg.warmup)  # fewer if the run ended
        trainer.log(f"profile: steps {trainer.step - traced + 1}-{trainer.step} traced into {path}")

    def post_step(self, trainer: Trainer, step: int, out) -> None:
        if self.profiler is None:
            return
        self.steps_seen += 1  # before step(): the trace it may write counts this step
        self.profiler.step()
        if self.steps_seen >= self.cfg.wait + self.cfg.warmup + self.cfg.steps:
            self._stop()

    def on_fit_end(self, trainer: Trainer) -> None:
        self._stop()  # a run shorter than the schedule: what was traced so far

    def close(self, trainer: Trainer) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.profiler is not None:
            profiler, self.profiler = self.profiler, None
            profiler.stop()
            if torch.cuda.is_available() and self.cfg.memory_snapshot:
                torch.cuda.memory._record_memory_history(enabled=None)  # also where no trace was written
