"""In-loop evaluation: validation losses on the run's named sets every ``train.eval_interval`` steps, and
OLMo's downstream tasks every ``downstream.interval`` steps; both at the last step too."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdd_train.train.callbacks.base import Callback

if TYPE_CHECKING:
    from sdd_train.eval.downstream import DownstreamTask
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


class DownstreamCallback(Callback):
    """Scores the tasks built at start-up (tokenised once) and logs ``downstream/<task>[/<metric>]``."""

    name = "downstream"
    priority = 69  # after validation: a step's records come in the same order every time

    def __init__(self, tasks: list[DownstreamTask], interval: int) -> None:
        self.tasks, self.interval = tasks, interval

    def post_step(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        if step % self.interval == 0 or step == trainer.cfg.train.max_steps:
            trainer.write("metrics", {"step": step, **trainer.module.evaluate_downstream(self.tasks)}, console=True)
