"""Loss-spike detection: compare each step's loss and gradient norm with rolling statistics.

A step is a spike when a watched value exceeds ``mean + sigmas * std`` of the last ``window``
accepted steps *and* is at least ``min_increase`` above the mean (a flat plateau has a tiny std,
and noise on it is not a spike). Values of steps that were skipped or rolled back never enter
the window, so one spike does not raise the bar for the next. The state is a few lists of floats
and is saved in every checkpoint, so a resumed run makes the same decisions.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from sdd_train.config import SpikeConfig


@dataclass(frozen=True)
class Spike:
    metric: str  # loss | grad_norm
    value: float
    mean: float
    std: float
    threshold: float

    def describe(self) -> str:
        return (f"{self.metric} {self.value:.4g} > threshold {self.threshold:.4g}"
                f" (rolling mean {self.mean:.4g}, std {self.std:.3g})")


class SpikeDetector:
    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.history: dict[str, deque[float]] = {m: deque(maxlen=cfg.window) for m in ("loss", "grad_norm")}

    @property
    def enabled(self) -> bool:
        return self.cfg.action != "none"

    def _sigmas(self, metric: str) -> float:
        return self.cfg.loss_sigmas if metric == "loss" else self.cfg.grad_norm_sigmas

    def check(self, loss: float, grad_norm: float) -> list[Spike]:
        """The spikes this step's values make (empty when none, or while the window is short)."""
        spikes = []
        for metric, value in (("loss", loss), ("grad_norm", grad_norm)):
            values, sigmas = self.history[metric], self._sigmas(metric)
            if sigmas <= 0 or len(values) < self.cfg.min_history:
                continue
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            threshold = max(mean + sigmas * std, mean * (1.0 + self.cfg.min_increase))
            if value > threshold:
                spikes.append(Spike(metric, value, mean, std, threshold))
        return spikes

    def accept(self, loss: float, grad_norm: float) -> None:
        """Add the values of a step whose update was applied."""
        self.history["loss"].append(loss)
        self.history["grad_norm"].append(grad_norm)

    def state_dict(self) -> dict[str, list[float]]:
        return {m: list(v) for m, v in self.history.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        for metric, values in self.history.items():
            values.clear()
            values.extend(state.get(metric, []))
