"""Learning-rate schedules (``optim.schedule``): the learning rate of a step is a pure function of the
step, so a resumed run (or a decay branch started from another run's checkpoint) needs no scheduler
state.

Every schedule reads the tokens done *including* the step, ``t``, as OLMo's schedulers do, and starts
with the same linear warmup from ``warmup_start * lr`` to ``lr`` (``warmup_steps`` or
``warmup_tokens``). After it, with ``floor = alpha_f * lr`` and the horizon ``H`` (``horizon_steps``,
``horizon_tokens``, else ``train.max_steps``):

- ``cosine``: from lr down to the floor at H along a half cosine, the floor after H (OLMo's
  ``CosWithWarmup``, the reference's);
- ``linear``: the same along a straight line;
- ``constant``: lr for ever;
- ``inverse_sqrt``: ``lr * sqrt(w / t)`` with ``w`` the warmup (one step when there is none), so lr
  at the warmup's end; no horizon, no floor;
- ``wsd`` (warmup, stable, decay): lr until the decay starts at ``H - D``, then down to the floor at
  H, the floor after it. ``D`` is ``decay_steps`` when set, else ``decay_fraction * H``; the decay's
  shape is ``decay_shape``: ``linear``, ``cosine`` or ``1-sqrt`` (``lr - (lr - floor) * sqrt(p)``
  at the decay's fraction ``p``, the cooldown of Haegele et al. 2024, "Scaling Laws and
  Compute-Optimal Training Beyond Fixed Training Durations").
"""

from __future__ import annotations

import math
from pathlib import Path

from sdd_train.config import OptimConfig, RunConfig
from sdd_train.config.schedule import phases


def decayed(lr: float, floor: float, shape: str, p: float) -> float:
    """The learning rate a fraction ``p`` (0..1) of the way through a decay from ``lr`` to ``floor``."""
    if shape == "cosine":
        return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "1-sqrt":
        return lr - (lr - floor) * math.sqrt(p)
    return lr - (lr - floor) * p


def lr_at(step: int, cfg: OptimConfig, max_steps: int, tokens_per_step: int = 1) -> float:
    """Learning rate of optimizer step ``step`` (0-based); see the module docstring."""
    t = (step + 1) * tokens_per_step
    ph = phases(cfg, max_steps, tokens_per_step)
    if t < ph.warmup:
        start = cfg.warmup_start * cfg.lr
        return start + (cfg.lr - start) * t / ph.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * math.sqrt(max(ph.warmup, tokens_per_step) / t)
    floor = cfg.alpha_f * cfg.lr
    if t >= ph.horizon:
        return floor
    if t < ph.decay_start:
        return cfg.lr
    shape = cfg.decay_shape if cfg.schedule == "wsd" else cfg.schedule
    return decayed(cfg.lr, floor, shape, (t - ph.decay_start) / (ph.horizon - ph.decay_start))


def _steps(tokens: float, tokens_per_step: int) -> float:
    return tokens / tokens_per_step


def describe(cfg: RunConfig) -> str:
    """One line: the schedule, where its phases lie in steps, and its learning rates."""
    o, t = cfg.optim, cfg.train
    tps = t.global_batch_size * t.seq_len
    ph = phases(o, t.max_steps, tps)
    parts = [f"schedule: {o.schedule}", f"warmup {_steps(ph.warmup, tps):g} steps from {o.warmup_start * o.lr:g}"
             f" to lr {o.lr:g}"]
    if o.schedule == "wsd":
        parts.append(f"stable to step {_steps(ph.decay_start, tps):g}, then a {o.decay_shape} decay")
    if ph.horizon is not None:
        parts.append(f"down to {o.alpha_f * o.lr:g} at step {_steps(ph.horizon, tps):g}")
    last = lr_at(t.max_steps - 1, o, t.max_steps, tps)
    parts.append(f"step {t.max_steps} (the last) at {last:g}")
    return "; ".join(parts)


def plot(cfg: RunConfig, path: str | Path) -> Path:
    """The learning rate of every step of ``cfg``'s run as a PNG, its phase boundaries marked."""
    from sdd_train.diagnostics.plots import lr_schedule

    o, t = cfg.optim, cfg.train
    tps = t.global_batch_size * t.seq_len
    ph = phases(o, t.max_steps, tps)
    stride = max(1, t.max_steps // 2000)
    points = [(step + 1, lr_at(step, o, t.max_steps, tps)) for step in range(0, t.max_steps, stride)]
    marks = [(_steps(ph.warmup, tps), "warmup end")]
    if o.schedule == "wsd":
        marks.append((_steps(ph.decay_start, tps), "decay start"))
    if ph.horizon is not None:
        marks.append((_steps(ph.horizon, tps), "horizon"))
    return lr_schedule({f"{o.schedule} (lr {o.lr:g})": points}, Path(path),
                       [(s, label) for s, label in marks if s <= t.max_steps])
