"""The optimizer: AdamW, or Muon with AdamW (sdd_train/train/muon.py), over parameter groups (the
learning-rate schedules: sdd_train/train/schedules.py)."""

from __future__ import annotations

import torch
from torch import nn

from sdd_train.config import OptimConfig
from sdd_train.model.mup import hidden_lr_scale


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split parameters into groups: matrices, gains (norm weights, SDD alphas), embeddings, and for Muon
    or µP the LM head apart from the hidden matrices (AdamW updates it, at the base learning rate under
    µP; ``muon`` marks the groups Muon updates).

    Groups keep a ``name`` so logs and tests can tell them apart; ``lr_scale`` multiplies the schedule's
    learning rate (Muon's ``lr_multiplier``, µP's 1 / width on the hidden matrices); empty groups are
    dropped.
    """
    model_cfg = getattr(model, "cfg", None)
    mup = model_cfg is not None and model_cfg.parametrization == "mup"
    muon = cfg.name == "muon"
    embed = getattr(model, "embed", None)
    embed_ids = {id(embed.weight)} if embed is not None else set()
    head = getattr(model, "lm_head", None)
    head_ids = {id(head.weight)} if head is not None and (muon or mup) else set()
    groups: dict[str, list[nn.Parameter]] = {"matrices": [], "head": [], "gains": [], "embeddings": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embed_ids:
            groups["embeddings"].append(p)
        elif id(p) in head_ids:
            groups["head"].append(p)
        elif p.ndim < 2 or name.endswith("alpha"):  # MoE experts' SDD gains are [experts, features]
            groups["gains"].append(p)
        else:
            groups["matrices"].append(p)
    decay = {"matrices": True, "head": True, "gains": cfg.decay_gains, "embeddings": cfg.decay_embeddings}
    matrices_lr = cfg.muon.lr_multiplier if muon else 1.0
    if mup:
        matrices_lr *= hidden_lr_scale(model_cfg, cfg.muon.lr_adjust if muon else None)
    out = []
    for name, params in groups.items():
        if not params:
            continue
        group = {"name": name, "params": params, "weight_decay": cfg.weight_decay if decay[name] else 0.0}
        if muon or mup:
            group["lr_scale"] = matrices_lr if name == "matrices" else 1.0
        if muon:
            group["muon"] = name == "matrices"
        out.append(group)
    return out


def describe(model: nn.Module, cfg: OptimConfig) -> str:
    """One line for ``--dry-run``: which parameter groups each update rule gets, and their sizes."""

    def size(groups: list[dict]) -> str:
        return ", ".join(f"{g['name']} ({sum(p.numel() for p in g['params']):,})" for g in groups)

    groups = param_groups(model, cfg)
    if cfg.name != "muon":
        return f"optimizer: adamw on {size(groups)}"
    m = cfg.muon
    return (f"optimizer: muon on {size([g for g in groups if g['muon']])} (momentum {m.momentum:g},"
            f" {m.ns_steps} Newton-Schulz steps, ns_dtype {m.ns_dtype}, lr {cfg.lr * m.lr_multiplier:g} x {m.lr_adjust});"
            f" adamw on {size([g for g in groups if not g['muon']])}")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.name == "muon":
        from sdd_train.train.muon import Muon, resolve_ns_dtype

        m = cfg.muon
        device = next(model.parameters()).device
        return Muon(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, momentum=m.momentum, nesterov=m.nesterov,
                    ns_steps=m.ns_steps, lr_adjust=m.lr_adjust, ns_dtype=resolve_ns_dtype(m.ns_dtype, device))
    # fused: one kernel per parameter group instead of ~10 ops per tensor (benchmarks/cpu_ops.py)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
