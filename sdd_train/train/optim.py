"""AdamW with parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from sdd_train.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split parameters into weight-decay groups: matrices, gains (norm weights, SDD alphas), embeddings.

    Groups keep a ``name`` so logs and tests can tell them apart; empty groups are dropped.
    """
    embed = getattr(model, "embed", None)
    embed_ids = {id(embed.weight)} if embed is not None else set()
    groups: dict[str, list[nn.Parameter]] = {"matrices": [], "gains": [], "embeddings": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embed_ids:
            groups["embeddings"].append(p)
        elif p.ndim < 2 or name.endswith("alpha"):  # MoE experts' SDD gains are [experts, features]
            groups["gains"].append(p)
        else:
            groups["matrices"].append(p)
    decay = {"matrices": True, "gains": cfg.decay_gains, "embeddings": cfg.decay_embeddings}
    return [
        {"name": name, "params": params, "weight_decay": cfg.weight_decay if decay[name] else 0.0}
        for name, params in groups.items()
        if params
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # fused: one kernel per parameter group instead of ~10 ops per tensor (the tiny model's step on
    # the 2-core dev machine: 4.2 ms instead of 8.7 ms, benchmarks/cpu_ops.py); CPU and CUDA have it
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=True)


def lr_at(step: int, cfg: OptimConfig, max_steps: int, tokens_per_step: int = 1) -> float:
    """Learning rate of optimizer step ``step`` (0-based), a pure function of it (resuming needs no state).

    As OLMo's ``CosWithWarmup``: the schedule reads the tokens done *including* this step, ``t``.
    Linear warmup from ``warmup_start * lr`` (reaching lr at the warmup's end), then a cosine from
    lr down to ``alpha_f * lr`` at the horizon, constant after it. Warmup and horizon may be given
    in steps or in tokens (``warmup_tokens``, ``horizon_tokens``); the horizon defaults to
    ``max_steps``, so the last step trains at ``alpha_f * lr``.
    """
    t = (step + 1) * tokens_per_step
    warmup = cfg.warmup_tokens if cfg.warmup_tokens is not None else cfg.warmup_steps * tokens_per_step
    if cfg.horizon_tokens is not None:
        horizon = cfg.horizon_tokens
    else:
        horizon = (cfg.horizon_steps if cfg.horizon_steps is not None else max_steps) * tokens_per_step
    floor = cfg.alpha_f * cfg.lr
    if t < warmup:
        start = cfg.warmup_start * cfg.lr
        return start + (cfg.lr - start) * t / warmup
    if t >= horizon:
        return floor
    progress = (t - warmup) / (horizon - warmup)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
