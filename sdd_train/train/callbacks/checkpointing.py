"""Checkpoints: every ``train.checkpoint_interval`` steps, every ``permanent_checkpoint_interval``
(kept forever), at the last step, and on SIGTERM / SIGUSR1 (Slurm preemption), after which the run
stops with exit code 0; re-running the command resumes. Nothing non-finite is ever checkpointed.
Under torchrun the ranks agree on a signal every ``train.signal_check_interval`` steps (and at every
checkpoint), so a signal is acted on at most that many steps after it arrives (one more if it arrives
in such a step's optimizer update); their flag is reduced after such a step's backward and read with
its losses, in the step's one read. One process acts on a signal at the end of the step it arrives in.

A save that fails (a full disk, a quota, permissions) leaves the previous checkpoint the latest;
``train.checkpoint_failure`` decides: ``stop`` the run (exit 1), or ``retry`` at the next interval
(logged, and recorded in events.jsonl). The last step's save and a stop signal's always stop on
failure: there is no later chance."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

import torch

from sdd_train.checkpoint import CheckpointSaveError, checkpoint_dir
from sdd_train.distributed.world import all_reduce_max
from sdd_train.train.callbacks.base import Callback
from sdd_train.train.errors import TrainingDiverged
from sdd_train.train.stop_signals import STOPS

if TYPE_CHECKING:
    from sdd_train.train.train_module import StepOutput
    from sdd_train.train.trainer import Trainer


class CheckpointCallback(Callback):
    name = "checkpointing"
    priority = 50

    def on_fit_start(self, trainer: Trainer) -> None:
        STOPS.install()  # sdd-train installed it at start-up; a trainer built in code installs it here
        stopping = self._stop_requested(trainer)  # arrived while the run was set up
        if stopping:
            trainer.log(f"stopped by {signal.Signals(stopping).name} before step {trainer.step + 1}; nothing new"
                        " to checkpoint. Re-run the same command to resume.")
            trainer.request_stop(signal.Signals(stopping).name)

    def post_backward(self, trainer: Trainer, step: int) -> None:
        """Ranks agree on a stop signal at the steps of :meth:`agrees`: the flag's all-reduce is queued
        after the step's backward and read with its losses (one read for the step, not one more)."""
        if trainer.world.distributed and self.agrees(trainer, step):
            trainer.read_with_step("stop_signal", self._ranks_signal(trainer))

    @staticmethod
    def saves(trainer: Trainer, step: int) -> bool:
        t = trainer.cfg.train
        interval = t.checkpoint_interval and step % t.checkpoint_interval == 0
        permanent = t.permanent_checkpoint_interval and step % t.permanent_checkpoint_interval == 0
        return bool(interval or permanent or step == t.max_steps)

    def agrees(self, trainer: Trainer, step: int) -> bool:
        """Every ``train.signal_check_interval`` steps and at checkpoints: the same steps on every rank."""
        return self.saves(trainer, step) or step % trainer.cfg.train.signal_check_interval == 0

    def post_step(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        t = trainer.cfg.train
        saving = self.saves(trainer, step)
        if not trainer.world.distributed:
            stopping = STOPS.received
        else:
            stopping = int(out.carried_value("stop_signal")) if "stop_signal" in out.carried else 0
        if saving or stopping:
            if not trainer.module.parameters_finite():
                raise TrainingDiverged(f"step {step}: the model has non-finite parameters; not checkpointing it."
                                       f" The last good checkpoint (if any) is in {checkpoint_dir(trainer.run_dir)}")
            try:
                path = trainer.save_checkpoint()
            except CheckpointSaveError as e:
                if t.checkpoint_failure == "stop" or step == t.max_steps or stopping:
                    raise
                trainer.write("events", {"step": step, "event": "checkpoint_failed", "action": "retry",
                                         "error": str(e)})
                trainer.log(f"warning: {e}; the previous checkpoint stays the latest, saving again at the next"
                            " interval (train.checkpoint_failure=retry)")
                return
            if step == t.max_steps:
                trainer.log(f"checkpoint: {path}")
        if stopping:
            name = signal.Signals(stopping).name
            trainer.log(f"stopped by {name} at step {step}; checkpoint {checkpoint_dir(trainer.run_dir)}."
                        " Re-run the same command to resume.")
            trainer.request_stop(name)

    def _stop_requested(self, trainer: Trainer) -> int:
        """The signal number if any rank received SIGTERM/SIGUSR1, else 0 (ranks: an all-reduce and a read)."""
        if not trainer.world.distributed:
            return STOPS.received
        return int(self._ranks_signal(trainer).item())

    @staticmethod
    def _ranks_signal(trainer: Trainer) -> torch.Tensor:
        """The largest signal number any rank received, on the device (made there: no copy from the host)."""
        return all_reduce_max(torch.full((), float(STOPS.received), device=trainer.world.device))

    def on_fit_end(self, trainer: Trainer) -> None:
        trainer.checkpointer.wait()  # an async save in flight completes (or fails) before the process ends

    def close(self, trainer: Trainer) -> None:
        STOPS.restore()
