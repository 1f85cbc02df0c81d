"""Stability: non-finite steps (stop or skip) and loss spikes (log, skip, or roll back and leave the
offending batches out of the data stream).

Each decision needs the step's loss and gradient norm on the host before the update: this is the
one device read of a step that writes no record (the step's other values come with it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdd_train.checkpoint import checkpoint_dir
from sdd_train.config import RunConfig
from sdd_train.diagnostics.spikes import Spike, SpikeDetector
from sdd_train.train.callbacks.base import Action, Callback, Verdict
from sdd_train.train.errors import TrainingDiverged

if TYPE_CHECKING:
    from sdd_train.train.train_module import StepOutput
    from sdd_train.train.trainer import Trainer


class StabilityCallback(Callback):
    name = "stability"
    priority = 100  # decides the update before any other callback sees the step as applied

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.detector = SpikeDetector(cfg.diagnostics.spike)
        self.skipped = 0  # non-finite steps whose update was dropped
        self.spike_skips = 0  # spikes whose update was dropped
        self.rollbacks = 0
        self.consecutive = 0  # non-finite steps in a row
        self.max_grad_norm = 0.0  # since the last metrics record: spikes between log steps stay visible
        self._accepted: tuple[float, float] | None = None
        # A rollback asked for: (the spike's event, its log line, the rollback count after it,
        # the step's stream position). Not state: it outlives the reload it asks for.
        self._rollback: tuple[dict[str, Any], str, int, int] | None = None

    def step_action(self, trainer: Trainer, step: int, out: StepOutput) -> Verdict | None:
        self._rollback = None
        if not out.finite:
            self._nonfinite(trainer, step, out)
            return Verdict(Action.SKIP)
        self.max_grad_norm = max(self.max_grad_norm, out.grad_norm)
        spikes = self.detector.check(out.loss, out.grad_norm) if self.detector.enabled else []
        verdict = self._spike_verdict(trainer, step, out, spikes) if spikes else Verdict(Action.APPLY)
        if verdict.action is Action.SKIP:
            self.spike_skips += 1
        self._accepted = (out.loss, out.grad_norm) if verdict.action is Action.APPLY else None
        return verdict

    def post_optim_step(self, trainer: Trainer, step: int) -> None:
        if self._accepted is not None:  # only the values of applied updates enter the rolling window
            self.detector.accept(*self._accepted)
            self._accepted = None
        self.consecutive = 0

    def post_train_step(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        if not trainer.is_log_step(step) or not out.finite:
            return
        trainer.record_metric("grad_norm_max", self.max_grad_norm)
        self.max_grad_norm = 0.0
        for key, value in (("skipped_steps", self.skipped), ("spike_skips", self.spike_skips),
                           ("rollbacks", self.rollbacks)):
            if value:
                trainer.record_metric(key, value)

    # ------------------------------------------------------------------ non-finite steps

    def _nonfinite(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        policy = self.cfg.train.nonfinite
        message = f"step {step}: loss={out.loss} grad_norm={out.grad_norm} is not finite"
        trainer.write("events", {"step": step, "event": "nonfinite", "action": policy, "loss": out.loss,
                                 "grad_norm": out.grad_norm})
        last_good = f"The last good checkpoint (if any) is in {checkpoint_dir(trainer.run_dir)}"
        if policy == "stop":
            raise TrainingDiverged(f"{message}; the run diverged. Lower optim.lr, raise optim.warmup_steps, try"
                                   f" model.block=sdd, or set train.nonfinite=skip to drop such steps. {last_good}")
        trainer.log(f"warning: {message}; update skipped (train.nonfinite=skip)")
        self.skipped += 1
        self.consecutive += 1
        trainer.write("metrics", {"step": step, "loss": out.loss, "grad_norm": out.grad_norm, "skipped": True,
                                  "skipped_steps": self.skipped}, console=True)
        if self.consecutive >= self.cfg.train.max_nonfinite_skips:
            raise TrainingDiverged(f"step {step}: {self.consecutive} consecutive non-finite steps; the run"
                                   f" diverged. {last_good}")

    # ------------------------------------------------------------------ loss spikes

    def _spike_verdict(self, trainer: Trainer, step: int, out: StepOutput, spikes: list[Spike]) -> Verdict:
        """Apply ``diagnostics.spike.action`` to a spike; a rollback is the loop's to do, after the vote."""
        cfg = self.cfg.diagnostics.spike
        action, note = cfg.action, ""
        if action == "rollback" and self.rollbacks >= cfg.max_rollbacks:
            action = "skip"
            note = f"; {self.rollbacks} rollbacks already (diagnostics.spike.max_rollbacks), skipping instead"
        if action == "rollback" and not trainer.can_roll_back():
            action, note = "skip", "; no checkpoint to roll back to, skipping instead"
        position = trainer.position
        event: dict[str, Any] = {
            "step": step, "event": "loss_spike", "action": action, "loss": out.loss, "grad_norm": out.grad_norm,
            "position": position,
            "triggers": [{"metric": s.metric, "value": s.value, "mean": s.mean, "std": s.std,
                          "threshold": s.threshold} for s in spikes]}
        message = f"warning: loss spike at step {step}: " + "; ".join(s.describe() for s in spikes) + f" -> {action}"
        if action == "rollback":
            self._rollback = (event, message, self.rollbacks + 1, position)
            gbs = self.cfg.train.global_batch_size
            return Verdict(Action.ROLLBACK, frozenset(position + k * gbs for k in range(cfg.skip_batches)))
        trainer.write("events", event)
        trainer.log(message + note)
        return Verdict({"log": Action.APPLY, "skip": Action.SKIP}[action])

    def on_rollback(self, trainer: Trainer, step: int) -> None:
        """The rollback this callback asked for is done: its state is the checkpoint's, but the
        rollback count carries on, and the spike's event says where the run went back to."""
        if self._rollback is None:
            return
        event, message, self.rollbacks, position = self._rollback
        self._rollback = None
        event["rolled_back_to"] = step
        event["skipped_positions"] = sorted(p for p in trainer.excluded if p >= position)
        trainer.write("events", event)
        trainer.log(f"{message}; rolled back to step {step}, skipping {self.cfg.diagnostics.spike.skip_batches}"
                    f" batch(es) from position {position}")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"spike_detector": self.detector.state_dict(), "skipped_steps": self.skipped,
                "spike_skips": self.spike_skips, "rollbacks": self.rollbacks, "consecutive_nonfinite": self.consecutive,
                "max_grad_norm": self.max_grad_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state.get("spike_detector", {}))
        self.skipped = state.get("skipped_steps", 0)
        self.spike_skips = state.get("spike_skips", 0)
        self.rollbacks = state.get("rollbacks", 0)
        self.consecutive = state.get("consecutive_nonfinite", 0)
        self.max_grad_norm = state.get("max_grad_norm", 0.0)
