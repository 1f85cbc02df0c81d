"""The callback interface: what a piece of the training run sees of the loop, and when.

A step calls, in order: ``pre_step``; the forward and backward; ``post_backward`` (gradients
before clipping); clipping; ``step_action`` (any callback may skip the update or roll back);
``pre_optim_step``, the update, ``post_optim_step`` (only for an applied update), or the rollback
the vote asked for, then ``on_rollback``;
``post_train_step`` (record the step's metrics with ``trainer.record_metric``); the metrics record
is written on log steps; ``post_step`` (evaluation, statistics, checkpoints). Around the run:
``on_fit_start``, ``on_fit_end`` (after the last step), ``close`` (always, also after an error),
and ``on_rollback`` when the loop reloaded a checkpoint. ``on_record`` sees every record written.
Callbacks run in the order of their ``priority``, highest first (equal ones in the order given).

Each callback keeps its own state in every checkpoint under its ``name`` (``state_dict`` /
``load_state_dict``), so a resumed run continues exactly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the trainer imports the callbacks; they only see it through the hooks
    from sdd_train.train.train_module import StepOutput
    from sdd_train.train.trainer import Trainer


class Action(enum.Enum):
    """What happens to a step's update: applied, dropped, or undone by reloading a checkpoint."""

    APPLY = "apply"
    SKIP = "skip"
    ROLLBACK = "rollback"  # reload the latest checkpoint (done by the loop, after every callback voted)


@dataclass(frozen=True)
class Verdict:
    """A callback's say on a step's update. A rollback names the global batches to leave out of the
    data stream from then on, by stream position (``trainer.position`` is the step's own)."""

    action: Action
    exclude: frozenset[int] = frozenset()


class Callback:
    name = "callback"  # the key of its state in checkpoints; unique within a run
    priority = 0  # callbacks run highest first; the built-in ones are 5 and above (the run log 10, the profiler 5)

    def on_fit_start(self, trainer: Trainer) -> None:
        """After resuming, before the first step of this process."""

    def pre_step(self, trainer: Trainer, step: int) -> None:
        """Before the step that makes optimizer step ``step`` (1-based)."""

    def post_backward(self, trainer: Trainer, step: int) -> None:
        """Gradients of the whole global batch are in place, not yet clipped."""

    def step_action(self, trainer: Trainer, step: int, out: StepOutput) -> Verdict | Action | None:
        """Decide the update after clipping (``out.grad_norm`` is set); None leaves it to the others.
        A rollback wins the vote over a skip, a skip over applying. The loop acts after the vote: a
        callback never reloads state inside its own hook."""
        return None

    def pre_optim_step(self, trainer: Trainer, step: int) -> None:
        """Just before an update that will be applied."""

    def post_optim_step(self, trainer: Trainer, step: int) -> None:
        """Just after an applied update."""

    def post_train_step(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        """The step is done (``trainer.step == step``); record metrics for the log record here."""

    def post_step(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        """After the step's metrics record: evaluation, statistics, checkpoints, stopping."""

    def on_record(self, trainer: Trainer, stream: str, record: dict[str, Any], console: bool,
                  wandb_record: dict[str, Any] | None) -> None:
        """A record was written to ``stream`` (metrics, layer_stats, activations, events)."""

    def on_rollback(self, trainer: Trainer, step: int) -> None:
        """The loop reloaded the checkpoint of ``step`` (a rollback the vote asked for): every
        callback's state is the checkpoint's now, records after it are void."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """The last step of the run (or of this process, after a stop signal) is done."""

    def close(self, trainer: Trainer) -> None:
        """Release files, handlers and connections; runs after errors too."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """``state`` is what :meth:`state_dict` returned when the checkpoint was written ({} if none)."""
