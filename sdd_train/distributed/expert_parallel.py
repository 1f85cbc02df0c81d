"""MoE layers across ranks: expert parallelism, and load balancing over every rank's micro-batch.

Expert parallelism (``parallel.ep``): each rank of a ``dp_shard`` group holds ``n_experts / ep`` whole
experts, and every (token, expert) row travels to the rank that holds its expert and back.

Applied to a plain model, as FSDP2 is: the expert weights of each MoE layer become DTensors on the mesh
(split on the expert dimension over ``dp_shard``, replicated over ``dp_replicate``), FSDP2 leaves them
alone (``ignored_params``: they are never all-gathered), and the layer's ``run_experts`` method is
replaced by one that

1. exchanges how many rows each rank sends to each of the others' experts (one all-to-all of counts),
2. sends the rows (sorted by expert, so each destination's rows are contiguous; ``all_to_all_single``,
   differentiable), and orders what arrived by local expert,
3. runs the layer's own ``run_experts`` on them with the rank's experts (``to_local()``),
4. undoes the ordering and sends the results back where their rows came from.

The only host read is the row counts of step 1, which the all-to-all's split sizes need: one per layer
per forward (and one in a recomputing backward), as the experts' loop already needs.

Gradients: a rank's expert gradient sums what every rank's tokens sent it; the backward of the weights'
local view divides it by the world size (FSDP2's mean over ranks, which the other parameters get) and
sums it over the replica groups (HSDP), so the optimizer sees what one process computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import is_fake
from torch import nn

class _ExpertGradSync(torch.autograd.Function):
    """Identity forward; backward: the gradient / world size, summed over the replica group (if any)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, world_size: int, replicas: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.world_size, ctx.replicas = world_size, replicas
        return local.view_as(local)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad / ctx.world_size
        if ctx.replicas is not None:
            dist.all_reduce(grad, group=ctx.replicas)
        return grad, None, None


def _all_to_all(rows: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
                ) -> torch.Tensor:
    """Rows ``in_splits[j]`` at a time to rank j, ``out_splits[j]`` from it; differentiable (the backward
    sends the gradients back the other way)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(rows.contiguous(), out_splits, in_splits, group))


def _even(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def balanced_sizes(rows: int, ep: int, n_local: int) -> list[int]:
    """The split sizes of perfectly balanced routing, where every rank routes ``rows`` rows: an equal
    share to each rank (the ``ep`` send sizes), then ``ep`` x ``n_local`` received counts, one per
    (source rank, local expert)."""
    send = _even(rows, ep)
    return [*send, *(n for _ in range(ep) for n in _even(send[0], n_local))]


def expert_parallel_run(layer: nn.Module, group: dist.ProcessGroup, replicas: dist.ProcessGroup | None,
                        param_dtype: torch.dtype = torch.float32):
    """``layer.run_experts`` with the layer's experts split over the ranks of ``group``, computed with
    ``param_dtype`` copies of them (as FSDP2 computes with its all-gathered ``parallel.param_dtype`` ones)."""
    local_run = type(layer).run_experts.__get__(layer)  # the class's method: the computation, unsplit
    ep, world_size = dist.get_world_size(group), dist.get_world_size()

    @torch.compiler.disable  # split sizes change every forward: eager between the compiled graphs, no recompiles
    def run_experts(rows: torch.Tensor, counts: torch.Tensor, row_expert: torch.Tensor, params=None) -> torch.Tensor:
        n_local = counts.shape[0] // ep
        # 1. counts[j, e]: this rank's rows for expert e of rank j -> received[s, e]: rank s's rows for my expert e
        sent = counts.view(ep, n_local)
        received = torch.empty_like(sent)
        dist.all_to_all_single(received, sent.contiguous(), group=group)
        if is_fake(sent):  # the memory estimate's tensors hold no counts: routing taken as balanced
            sizes = balanced_sizes(rows.shape[0], ep, n_local)
        else:
            sizes = torch.cat([sent.sum(1), received.reshape(-1)]).tolist()  # the one host read
        send_splits, received_counts = sizes[:ep], sizes[ep:]
        recv_splits = [sum(received_counts[s * n_local:(s + 1) * n_local]) for s in range(ep)]
        # 2. rows out, then ordered by (local expert, source rank) from (source rank, local expert)
        arrived = _all_to_all(rows, recv_splits, send_splits, group)
        block = torch.repeat_interleave(torch.arange(ep * n_local, device=rows.device), received.reshape(-1),
                                        output_size=arrived.shape[0])
        local_expert = block % n_local
        order = (local_expert * ep + block // n_local).argsort(stable=True)
        # 3. this rank's experts on their rows
        given = params or layer.expert_params()
        local = type(given)(*(None if p is None else _ExpertGradSync.apply(p.to_local(), world_size, replicas)
                              .to(param_dtype) for p in given))
        y = local_run(arrived[order], received.sum(0), local_expert[order], local)
        # 4. back to the (source rank, local expert) order, and home
        y = torch.empty_like(y).index_copy(0, order, y)
        return _all_to_all(y, send_splits, recv_splits, group)

    return run_experts


def apply_expert_parallel(layers: Sequence[nn.Module], mesh, param_dtype: torch.dtype = torch.float32
                          ) -> set[nn.Parameter]:
    """Split the experts of every MoE layer in ``layers`` over the mesh's ``dp_shard`` ranks (replicated
    over ``dp_replicate``, if it has one) and route their rows there; returns the expert parameters,
    which FSDP2 must leave alone."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    names = mesh.mesh_dim_names
    placements = [Shard(0) if name == "dp_shard" else Replicate() for name in names]
    group = mesh.get_group("dp_shard")
    replicas = mesh.get_group("dp_replicate") if "dp_replicate" in names else None
    ignored: set[nn.Parameter] = set()
    for layer in layers:
        experts = {id(p) for p in layer.expert_params() if p is not None}
        for name, param in list(layer.named_parameters()):
            if id(param) not in experts:
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = layer.get_submodule(owner_name)
            split = nn.Parameter(distribute_tensor(param.data, mesh, placements), requires_grad=param.requires_grad)
            owner.register_parameter(attr, split)
            ignored.add(split)
        layer.run_experts = expert_parallel_run(layer, group, replicas, param_dtype)
    return ignored


def apply_all_ranks_balance(layers: Sequence[nn.Module], group: dist.ProcessGroup | None = None) -> None:
    """``model.moe.lb_loss_scope=all_ranks``: each MoE layer's load-balancing loss counts the (token, expert)
    pairs of every rank's micro-batch (an all-reduce of E integers per layer, which compile traces)."""
    from torch.distributed._functional_collectives import all_reduce, wait_tensor

    group = group or dist.group.WORLD
    for layer in layers:
        if layer.lb_loss_scope == "all_ranks":
            layer.all_ranks_counts = lambda counts: wait_tensor(all_reduce(counts, "sum", group))
