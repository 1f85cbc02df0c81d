"""Where a learning-rate schedule's phases (warmup, stable, decay) start and end, from the config alone:
config validation checks them before a run starts, and sdd_train/train/schedules.py draws the curve
between them."""

from __future__ import annotations

from dataclasses import dataclass

from sdd_train.config.schema import OptimConfig


@dataclass(frozen=True)
class Phases:
    """Where a schedule's phases start and end, in tokens (the units ``lr_at`` reads)."""

    warmup: float
    decay_start: float | None  # None: the schedule has no decay phase (constant, inverse_sqrt)
    horizon: float | None  # the end of the decay; None as above


def phases(cfg: OptimConfig, max_steps: int, tokens_per_step: int = 1) -> Phases:
    """The phases in tokens: ``warmup_*``, ``horizon_*`` (else ``max_steps``) and the wsd decay keys."""
    warmup = cfg.warmup_tokens if cfg.warmup_tokens is not None else cfg.warmup_steps * tokens_per_step
    if cfg.schedule in ("constant", "inverse_sqrt"):
        return Phases(warmup, None, None)
    if cfg.horizon_tokens is not None:
        horizon = cfg.horizon_tokens
    else:
        horizon = (cfg.horizon_steps if cfg.horizon_steps is not None else max_steps) * tokens_per_step
    if cfg.schedule != "wsd":
        return Phases(warmup, warmup, horizon)
    decay = cfg.decay_steps * tokens_per_step if cfg.decay_steps is not None else cfg.decay_fraction * horizon
    return Phases(warmup, horizon - decay, horizon)  # validation: the decay starts after the warmup
