"""Router diagnostics for MoE runs, over each logging window (the steps since the previous metrics
record): per layer, the experts that received no token (``moe/layer_<i>/idle_experts``), the most
loaded expert's pairs over the least loaded one's (``load_ratio``; an idle expert counts as one pair,
so the ratio stays finite and ``idle_experts`` says how many), and the router logits' RMS averaged over
the window's steps (``router_logit_rms``: a growing scale is a router sharpening towards collapse), in
``metrics.jsonl``; each expert's share of the window's pairs, layer by layer, in ``moe.jsonl`` (the
heat map of ``sdd-report``). The window is summed on the device and read once, at the log step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sdd_train.train.callbacks.base import Callback

if TYPE_CHECKING:
    from sdd_train.train.train_module import StepOutput
    from sdd_train.train.trainer import Trainer


class RouterCallback(Callback):
    name = "router"
    priority = 75

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.load: torch.Tensor | list | None = None  # [layers, experts] pairs over the window
        self.rms: torch.Tensor | list | None = None  # [layers] summed over the window's steps
        self.steps = 0

    def post_train_step(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        if out.expert_load is None:
            return
        if isinstance(self.load, list):  # restored from a checkpoint's meta.json
            self.load = torch.tensor(self.load, dtype=out.expert_load.dtype, device=out.expert_load.device)
            self.rms = torch.tensor(self.rms, dtype=out.router_logit_rms.dtype, device=out.router_logit_rms.device)
        self.load = out.expert_load.clone() if self.load is None else self.load + out.expert_load
        self.rms = out.router_logit_rms.clone() if self.rms is None else self.rms + out.router_logit_rms
        self.steps += 1
        if not (trainer.is_log_step(step) and out.finite):
            return
        rows = torch.cat([self.load.double(), self.rms.double()[:, None] / self.steps], 1).tolist()  # one read
        shares = []
        for i, row in enumerate(rows):
            counts, rms = row[:-1], row[-1]
            trainer.record_metric(f"moe/layer_{i}/idle_experts", sum(c == 0 for c in counts))
            trainer.record_metric(f"moe/layer_{i}/load_ratio", max(counts) / max(min(counts), 1.0))
            trainer.record_metric(f"moe/layer_{i}/router_logit_rms", rms)
            shares.append([round(c / max(sum(counts), 1.0), 6) for c in counts])
        trainer.write("moe", {"step": step, "steps": self.steps, "share": shares}, wandb_record={"step": step})
        self._reset()

    def on_rollback(self, trainer: Trainer, step: int) -> None:
        self._reset()

    def state_dict(self) -> dict[str, Any]:
        if self.load is None:
            return {}
        as_list = (lambda t: t if isinstance(t, list) else t.tolist())
        return {"load": as_list(self.load), "rms": as_list(self.rms), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        if state:
            self.load, self.rms, self.steps = state["load"], state["rms"], state["steps"]
