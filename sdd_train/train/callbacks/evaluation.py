"""In-loop validation: every ``train.eval_interval`` steps and at the last, on the run's named sets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdd_train.train.callbacks.base import Callback

if TYPE_CHECKING:
    from sdd_train.train.train_module import StepOutput
    from sdd_train.train.trainer import Trainer


class EvaluationCallback(Callback):
    name = "evaluation"
    priority = 70

    def __init__(self, interval: int) -> None:
        self.interval = interval

    def post_step(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        if not trainer.eval_sets or not (step % self.interval == 0 or step == trainer.cfg.train.max_steps):
            return
        val = trainer.module.evaluate(trainer.eval_sets)
        trainer.write("metrics", {"step": step, **val}, console=True)
