"""Per-layer gradient, parameter and update norms, grouped by parameter family (paper Fig. 7).

Every parameter belongs to one group ``(layer, family)``: the linear families ``att_proj``,
``attn_out``, ``ff_proj``, ``ff_out`` (``expert_proj`` / ``expert_out`` and ``router`` in MoE
blocks), the block's ``gains`` (norm weights and SDD alphas), and the global ``embed``,
``lm_head`` and ``final_norm``. Norms are exact global L2 norms: each rank sums the squares of
its local shard, one all-reduce adds them up, and a tensor replicated over k ranks is counted
once (HSDP replica groups, unsharded parameters).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sdd_train.distributed.world import all_reduce_sum
from sdd_train.kernels import sum_of_squares

LINEAR_FAMILIES = ("att_proj", "attn_out", "ff_proj", "ff_out", "expert_proj", "expert_out", "router")


def family_of(name: str, is_moe_block: bool) -> tuple[int | None, str]:
    """``blocks.3.feed_forward.ff_out.weight`` -> (3, 'ff_out'); gains and global tensors by role."""
    parts = name.split(".")
    if parts[0] != "blocks":
        return None, parts[0]  # embed, lm_head, final_norm
    layer, leaf, owner = int(parts[1]), parts[-1], parts[-2]
    if leaf in ("alpha", "residual_gate") or "norm" in owner:
        return layer, "gains"
    if is_moe_block and owner in ("ff_proj", "ff_out"):
        return layer, "expert_" + owner.removeprefix("ff_")
    return layer, owner


def group_key(layer: int | None, family: str) -> str:
    return family if layer is None else f"layer_{layer}/{family}"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if type(t).__name__ == "DTensor" else t


def replica_count(t: torch.Tensor, world_size: int) -> int:
    """On how many ranks each element of ``t`` lives (so that a world-wide sum counts it once)."""
    if type(t).__name__ != "DTensor":
        return world_size  # a plain tensor in a distributed run is the same on every rank
    from torch.distributed.tensor import Replicate

    return math.prod(t.device_mesh.size(i) for i, p in enumerate(t.placements) if isinstance(p, Replicate))


class LayerStats:
    """Computes the grouped norms of one model; build once, call on the steps that log them."""

    def __init__(self, model: nn.Module, world_size: int = 1):
        self.world_size = world_size
        moe_layers = {i for i, b in enumerate(getattr(model, "blocks", [])) if hasattr(b.feed_forward, "router")}
        self.keys: list[str] = []
        self.params: list[nn.Parameter] = []
        index: list[int] = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            layer, family = family_of(name, is_moe_block=name.startswith("blocks.")
                                      and int(name.split(".")[1]) in moe_layers)
            key = group_key(layer, family)
            if key not in self.keys:
                self.keys.append(key)
            self.params.append(p)
            index.append(self.keys.index(key))
        self.index = torch.tensor(index)
        self.weights = torch.tensor([1.0 / replica_count(p, world_size) for p in self.params], dtype=torch.float64)

    def _norms(self, tensors: list[torch.Tensor | None]) -> list[float]:
        """Global L2 norm of each group, from per-rank local tensors (None counts as zero)."""
        device = self.params[0].device
        squares = torch.stack([
            sum_of_squares(_local(t).detach().float()) if t is not None else torch.zeros((), device=device)
            for t in tensors
        ]).double() * self.weights.to(device)
        grouped = torch.zeros(len(self.keys), dtype=torch.float64, device=device)
        grouped.index_add_(0, self.index.to(device), squares)
        grouped = all_reduce_sum(grouped)
        return grouped.sqrt().tolist()

    def gradients(self) -> dict[str, float]:
        """``grad/<group>``: norms of the current (unclipped) gradients."""
        return {f"grad/{k}": v for k, v in zip(self.keys, self._norms([p.grad for p in self.params]))}

    def snapshot(self) -> list[torch.Tensor]:
        """The local parameter values before an optimizer step, for :meth:`updates`."""
        return [_local(p).detach().clone() for p in self.params]

    def updates(self, before: list[torch.Tensor]) -> dict[str, float]:
        """``param/<group>`` norms and ``update/<group>`` = ||new - old|| / ||old|| of the last step."""
        old = self._norms(before)
        delta = self._norms([_local(p).detach() - b for p, b in zip(self.params, before)])
        new = self._norms([p for p in self.params])
        out = {f"param/{k}": v for k, v in zip(self.keys, new)}
        out.update({f"update/{k}": d / o if o > 0 else 0.0 for k, d, o in zip(self.keys, delta, old)})
        return out
