"""Diagnostics in the loop: per-layer gradient / parameter / update norms (``layer_stats.jsonl``) and
activation statistics on a fixed held-out batch (``activations.jsonl``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sdd_train.train.callbacks.base import Callback

if TYPE_CHECKING:
    from sdd_train.diagnostics.layer_stats import LayerStats
    from sdd_train.train.train_module import StepOutput
    from sdd_train.train.trainer import Trainer


class LayerStatsCallback(Callback):
    """Every ``diagnostics.layer_stats_interval`` steps and at the last: the norms of each parameter
    family per layer, gradients before clipping, parameters and relative updates after the update."""

    name = "layer_stats"
    priority = 90

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.stats: LayerStats | None = None
        self.record: dict[str, float] | None = None  # the gradients of this step, while it is a stats step
        self.before: list[torch.Tensor] | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self.stats = trainer.module.layer_stats()

    def post_backward(self, trainer: Trainer, step: int) -> None:
        due = step % self.interval == 0 or step == trainer.cfg.train.max_steps
        self.record = self.stats.gradients() if due else None

    def pre_optim_step(self, trainer: Trainer, step: int) -> None:
        self.before = self.stats.snapshot() if self.record is not None else None

    def post_optim_step(self, trainer: Trainer, step: int) -> None:
        if self.before is not None:  # written for applied updates only
            self.record.update(self.stats.updates(self.before))
            trainer.write("layer_stats", {"step": step, **self.record})
        self.record = self.before = None


class ActivationsCallback(Callback):
    """Every ``diagnostics.activation_interval`` steps and at the last: the residual-stream RMS after
    every block and the layer-by-layer similarity, on the first batch of the first validation set."""

    name = "activations"
    priority = 60

    def __init__(self, interval: int) -> None:
        self.interval = interval

    def post_step(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        if not trainer.eval_sets or not (step % self.interval == 0 or step == trainer.cfg.train.max_steps):
            return
        stats = trainer.module.activation_stats(trainer.eval_sets[0].batches[0])
        rms = {f"act/layer_{i}/rms": v for i, v in enumerate(stats["rms"])}
        trainer.write("activations", {"step": step, **stats}, wandb_record={"step": step, **rms})
