"""The training loop: one process (``sdd-train``) or many (``torchrun``), the same code.

The loop owns the step counter and the position in the data stream. A step: the data feed gives
this rank's micro-batches of the next global batch, the train module runs their forward and
backward, clips, and (unless a callback decides otherwise) updates; everything else is a callback
(``sdd_train.train.callbacks``) that sees the step at fixed hooks and keeps its own state in the
checkpoint. Running the same command again resumes from the latest checkpoint, with any number of
ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdd_train.checkpoint import Checkpointer, Restore, complete_checkpoints
from sdd_train.config import RunConfig, as_dict, save_config
from sdd_train.data.loader import MixtureLoader
from sdd_train.distributed.world import World, broadcast_object
from sdd_train.eval.validation import EvalSet
from sdd_train.kernels import slow_bf16_matmuls
from sdd_train.train.callbacks import Action, Callback, Verdict
from sdd_train.train.data_feed import DataFeed
from sdd_train.train.train_module import StepOutput, TrainModule


class Trainer:
    def __init__(self, cfg: RunConfig, world: World, module: TrainModule, feed: DataFeed, loader: MixtureLoader,
                 callbacks: list[Callback], checkpointer: Checkpointer, eval_sets: list[EvalSet],
                 data_fingerprints: list[str], log: Callable[..., None]) -> None:
        self.cfg, self.world, self.module, self.feed, self.loader = cfg, world, module, feed, loader
        self.callbacks, self.checkpointer, self.eval_sets, self.log = callbacks, checkpointer, eval_sets, log
        self.data_fingerprints = data_fingerprints
        self.run_dir = cfg.resolved_run_dir
        self.step = 0  # optimizer steps done (skipped updates count)
        self.position = 0  # training instances consumed from the stream
        self.excluded: set[int] = set()  # stream positions of global batches a rollback left out
        self.start_step = 0  # the step this process started from
        self.stop_reason: str | None = None
        self._metrics: dict[str, Any] = {}  # recorded by callbacks during the current step
        self._carried: dict[str, torch.Tensor] = {}  # device scalars callbacks read with the current step's values
        self.restore = Restore(cfg, checkpointer, log)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> Path:
        """Train to ``train.max_steps``, resuming from the latest checkpoint if there is one."""
        t = self.cfg.train
        restored = self.restore.newest(self.load_checkpoint)
        if restored is not None:
            meta = restored.meta
            if meta.get("data", {}).get("fingerprints", self.data_fingerprints) != self.data_fingerprints:
                self.log("warning: the training data changed since this checkpoint; continuing at the same"
                         " stream position")
            self.log(f"resume: from {restored.path} (step {self.step}, {self.position:,} instances consumed, written"
                     f" by {meta['world_size']} rank(s))")
        if self.world.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
        self.log(self.module.describe(t.seq_len))
        par = f", {self.world.dims.describe()}" if self.world.distributed else ""
        blocks = self.module.checkpointed_blocks
        ac = f", activation checkpointing on {len(blocks)} blocks" if blocks else ""
        self.log(f"train: {t.max_steps} steps x {t.global_batch_size * t.seq_len:,} tokens ({self.feed.accum}"
                 f" micro-batches of {t.micro_batch_size} x {t.seq_len} per rank), {t.precision} on"
                 f" {self.world.device}{par}{ac}, run dir {self.run_dir}")
        deferred = self.module.deferred_gradient_bytes(self.feed.accum)
        if deferred:
            self.log(f"memory: parallel.defer_grad_sync holds every gradient unsharded in fp32 across the"
                     f" {self.feed.accum} micro-batches of a step, {deferred / 2**20:,.1f} MiB on each rank;"
                     " parallel.defer_grad_sync=false keeps them sharded (a reduce-scatter per micro-batch)")
        slow = slow_bf16_matmuls(self.world.device) if t.precision == "bf16" else None
        if slow:
            self.log(f"warning: train.precision=bf16: {slow}")
        if self.step >= t.max_steps:
            self.log(f"train: already complete at step {self.step}")
            return self.run_dir
        self.start_step = self.step
        self._call("on_fit_start")
        self._record_rejections()
        try:
            while self.step < t.max_steps and self.stop_reason is None:
                self._train_step()
            self._call("on_fit_end")
        finally:
            self.feed.close()
            self._call("close")
        return self.run_dir

    def _train_step(self) -> None:
        t = self.cfg.train
        step = self.step + 1  # the optimizer step this one makes
        self.position = self.feed.next_position(self.position, self.excluded)
        self._carried = {}
        self._call("pre_step", step)
        start = time.perf_counter()
        out = self.module.train_batch(self.feed.micro_batches(self.position, self.excluded), self.feed.accum, step)
        self._call("post_backward", step)
        out.carried.update(self._carried)
        self.module.clip_gradients(out)
        verdict = self._decide(step, out)
        if verdict.action is Action.ROLLBACK:
            if self.rollback(verdict.exclude) is not None:  # the state is the checkpoint's now
                return
            self.log(f"warning: step {step}: no checkpoint left to roll back to; the update is skipped")
            verdict = Verdict(Action.SKIP)
        if verdict.action is Action.APPLY:
            self._call("pre_optim_step", step)
            self.module.optim_step(out)
            self._call("post_optim_step", step)
        self.module.zero_grad()
        self.step, self.position = step, self.position + t.global_batch_size
        out.step_time = time.perf_counter() - start
        self._metrics = {}
        self._call("post_train_step", step, out)
        if self.is_log_step(step) and out.finite:  # the log step first: out.finite reads the device
            record = {"step": step, "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm, **out.metrics,
                      **out.expert_load_metrics(), **self._metrics}
            self.write("metrics", record, console=True)
        self._call("post_step", step, out)

    def _decide(self, step: int, out: StepOutput) -> Verdict:
        """The callbacks' vote on the update: every callback votes; a rollback wins (leaving out the
        batches any of them named), else any skip drops the update."""
        verdicts = [Verdict(v) if isinstance(v, Action) else v
                    for v in (callback.step_action(self, step, out) for callback in self.callbacks) if v is not None]
        for action in (Action.ROLLBACK, Action.SKIP):
            chosen = [v for v in verdicts if v.action is action]
            if chosen:
                return Verdict(action, frozenset().union(*(v.exclude for v in chosen)))
        return Verdict(Action.APPLY)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # ------------------------------------------------------------------ for callbacks

    def is_log_step(self, step: int) -> bool:
        """Steps with a metrics record: the first, every ``train.log_interval`` and the last; the same in
        a resumed run as in an uninterrupted one (records hold values accumulated since the last one)."""
        t = self.cfg.train
        return step % t.log_interval == 0 or step in (1, t.max_steps)

    def read_with_step(self, name: str, value: torch.Tensor) -> None:
        """A device scalar a callback needs in this step, read in the step's one read with its losses
        (``out.carried_value(name)``) rather than in a read of its own; called in ``pre_step`` or
        ``post_backward``."""
        self._carried[name] = value

    def record_metric(self, key: str, value: float) -> None:
        """A value for this step's metrics record (written on log steps, after ``post_train_step``)."""
        self._metrics[key] = value

    def write(self, stream: str, record: dict[str, Any], console: bool = False,
              wandb_record: dict[str, Any] | None = None) -> None:
        """A record of ``stream`` (metrics, layer_stats, activations, events) for the run log callbacks."""
        self._call("on_record", stream, record, console, wandb_record)

    def request_stop(self, reason: str) -> None:
        """End the run after this step (the caller has saved what needs saving)."""
        self.stop_reason = reason

    def save_checkpoint(self) -> Path:
        """Model, optimizer, the loop's position and every callback's state, as the checkpoint of this step."""
        t = self.cfg.train
        data = {"instances_consumed": self.position, "epoch": self.loader.epoch_of(self.position), "seed": t.seed,
                "fingerprints": self.data_fingerprints, "skipped_positions": sorted(self.excluded)}
        meta = {"tokens_seen": self.position * t.seq_len, "data": data,
                "callbacks": {c.name: c.state_dict() for c in self.callbacks}, "config": as_dict(self.cfg)}
        return self.module.save(self.checkpointer, self.step, meta)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore everything :meth:`save_checkpoint` wrote (resharding to this world as needed)."""
        meta = self.module.load(self.checkpointer, path)
        data = meta.get("data", {})
        self.step = meta["step"]
        self.position = data.get("instances_consumed", self.step * self.cfg.train.global_batch_size)
        self.excluded = set(data.get("skipped_positions", []))
        states = meta.get("callbacks", {})
        for callback in self.callbacks:
            callback.load_state_dict(states.get(callback.name, {}))
        self.feed.clear()
        return meta

    def can_roll_back(self) -> bool:
        """Whether the run has a checkpoint a rollback could go back to (an async save in flight is waited for)."""
        self.checkpointer.wait()
        return bool(broadcast_object(complete_checkpoints(self.run_dir)))

    def rollback(self, exclude: frozenset[int]) -> int | None:
        """Reload the latest usable checkpoint and leave the global batches at ``exclude`` out of the
        stream from now on; returns the step it went back to (None: there is no checkpoint). Called by
        the loop after the callbacks' vote, never from inside a callback."""
        self.checkpointer.wait()
        excluded = self.excluded | exclude
        self.module.zero_grad()
        if self.restore.newest(self.load_checkpoint) is None:
            return None
        self.excluded |= excluded
        self._record_rejections()
        self._call("on_rollback", self.step)
        return self.step

    def _record_rejections(self) -> None:
        """What a restore set aside or allowed, in events.jsonl at the step the run continued from."""
        for event in self.restore.take_events():
            self.write("events", {"step": self.step, **event})
