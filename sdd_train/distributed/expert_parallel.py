"""MoE layers across ranks: expert parallelism, and load balancing over every rank's micro-batch.

Expert parallelism (``parallel.ep``): the ``dp_shard`` ranks of a group form EP groups of ``ep``
consecutive ranks; each rank of an EP group holds ``n_experts / ep`` experts, and every (token, expert)
row travels to the rank of its EP group that holds its expert and back. With ``ep`` = ``dp_shard`` a
rank holds its experts whole; with fewer, the ranks that hold the same experts in different EP groups
(``expert_shard`` of them) split each expert's rows of output features between them and all-gather
them for the layer's computation (the backward reduce-scatters their gradient), as FSDP2 does for the
other parameters.

Applied to a plain model, as FSDP2 is: the expert weights of each MoE layer become DTensors (split on
the expert dimension over the EP ranks, on the output-feature dimension over ``expert_shard``,
replicated over ``dp_replicate``), FSDP2 leaves them alone (``ignored_params``), and the layer's
``run_experts`` method is replaced by one that

1. exchanges how many rows each rank sends to each of the others' experts (one all-to-all of counts),
2. sends the rows (sorted by expert, so each destination's rows are contiguous; ``all_to_all_single``,
   differentiable), and orders what arrived by local expert,
3. runs the layer's own ``run_experts`` on them with the rank's experts (``to_local()``),
4. undoes the ordering and sends the results back where their rows came from.

The only host read is the row counts of step 1, which the all-to-all's split sizes need: one per layer
per forward (and one in a recomputing backward), as the experts' loop already needs.

Gradients: a rank's expert gradient sums what every rank of its EP group sent it; the all-gather's
backward sums the ``expert_shard`` ranks' gradients into each one's shard, and the backward of the
weights' local view divides that by the world size (FSDP2's mean over ranks, which the other parameters
get) and sums it over the replica groups (HSDP), so the optimizer sees what one process computes. Under
``parallel.reshard_after_forward`` (the default) the gathered experts are freed after the forward and
gathered again for the backward, as FSDP2 does for the other parameters (saved-tensor hooks keep their
place in the autograd graph instead of them); with it false they are kept from the forward to the backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import is_fake
from torch import nn

from sdd_train.config import ConfigError
from sdd_train.distributed.dims import ParallelDims
from sdd_train.kernels import autocast_dtype

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


def _gathered(local: torch.Tensor, shards: dist.ProcessGroup | None) -> torch.Tensor:
    """The whole of an expert stack split on dimension 1 over ``shards``; the backward reduce-scatters (sums)."""
    if shards is None:
        return local
    import torch.distributed._functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd  # torch < 2.13
    return funcol.wait_tensor(gather(local.movedim(1, 0).contiguous(), 0, shards)).movedim(0, 1)


def _root(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def _materialized(piece: torch.Tensor, shards: dist.ProcessGroup | None, dtype: torch.dtype) -> torch.Tensor:
    """A rank's piece of an expert stack made whole (all-gathered over ``shards``) in ``dtype``."""
    return _gathered(piece, shards).to(dtype)


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (activation checkpointing's) already decide what the forward keeps."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _storage(t: torch.Tensor) -> int:
    """Which storage ``t`` views (an alias that the autograd of a custom op saves is no view of its input)."""
    return t.untyped_storage()._cdata


@contextlib.contextmanager
def _gathered_again_in_backward(gathered: Sequence[torch.Tensor | None], regather: Callable[[int], torch.Tensor]
                                ) -> Iterator[None]:
    """Within this context, a tensor the autograd graph saves that is (a view of) one of ``gathered`` is kept
    as its place in it, and ``regather(i)`` makes that whole tensor again when the backward needs it (once for
    all of its views that one backward reads, dropped after the last): the all-gathered experts are freed
    after the forward, as FSDP2's ``reshard_after_forward`` frees the other parameters."""
    storages = [None if g is None else _storage(g) for g in gathered]
    pending: dict[int, int] = {}  # views of whole tensor i saved and not yet read
    again: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor):
        for i, storage in enumerate(storages):
            if storage is not None and _storage(t) == storage:
                pending[i] = pending.get(i, 0) + 1
                return i, t.size(), t.stride(), t.storage_offset()
        return t

    def unpack(saved):
        if isinstance(saved, torch.Tensor):
            return saved
        i, size, stride, offset = saved
        if i not in again:
            with torch.no_grad():
                again[i] = _root(regather(i))
        whole = again[i]
        pending[i] -= 1
        if not pending[i]:
            del again[i]
        return whole.as_strided(size, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def expert_parallel_run(layer: nn.Module, group: dist.ProcessGroup, replicas: dist.ProcessGroup | None,
                        param_dtype: torch.dtype = torch.float32, shards: dist.ProcessGroup | None = None,
                        reshard_after_forward: bool = True):
    """``layer.run_experts`` with the layer's experts split over the ranks of ``group`` (and each split
    over ``shards``), computed with ``param_dtype`` copies of them (as FSDP2 computes with its
    all-gathered ``parallel.param_dtype`` ones). With ``shards`` and ``reshard_after_forward`` the gathered
    experts are freed after the forward and gathered again by the backward."""
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
        pieces = [None if p is None else _ExpertGradSync.apply(p.to_local(), world_size, replicas) for p in given]
        # the matrices in the dtype the expert GEMMs take (so that the graph saves them, not a copy), the gains in
        # param_dtype
        dtypes = [autocast_dtype(rows) if name.endswith("weight") else param_dtype for name in given._fields]
        local = type(given)(*(None if p is None else _materialized(p, shards, d) for p, d in zip(pieces, dtypes)))
        kept = contextlib.nullcontext()
        # under activation checkpointing the checkpoint's hooks drop what the forward saves already, and its
        # recompute gathers the experts again
        if shards is not None and reshard_after_forward and not _saved_tensor_hooks_active():
            kept = _gathered_again_in_backward(local, lambda i: _materialized(pieces[i].detach(), shards, dtypes[i]))
        with kept:
            y = local_run(arrived[order], received.sum(0), local_expert[order], local)
        # 4. back to the (source rank, local expert) order, and home
        y = torch.empty_like(y).index_copy(0, order, y)
        return _all_to_all(y, send_splits, recv_splits, group)

    return run_experts


def check_expert_shards(out_features: Sequence[int], dims: ParallelDims) -> None:
    """Under expert parallelism (``dims.ep`` > 1) the ``dims.expert_shard`` ranks that share each expert split
    its matrices' output features (``out_features``: the up+gate projection's 2 x model.moe.expert_hidden,
    the down projection's model.d_model) evenly, or the run stops with a ConfigError naming the keys."""
    if dims.ep == 1:  # FSDP2 shards the experts with their block, padding as it needs
        return
    for size in out_features:
        if size % dims.expert_shard:
            raise ConfigError(
                f"parallel.ep: {dims.expert_shard} ranks share each expert (dp_shard {dims.dp_shard} / ep"
                f" {dims.ep}) and split its {size} output features, which they do not divide; set"
                f" parallel.ep={dims.dp_shard} or sizes (model.d_model, model.moe.expert_hidden) they divide")


def apply_expert_parallel(layers: Sequence[nn.Module], mesh, dims: ParallelDims, param_dtype: torch.dtype = torch.float32,
                          reshard_after_forward: bool = True) -> set[nn.Parameter]:
    """Split the experts of every MoE layer in ``layers`` over EP groups of ``dims.ep`` ranks of the mesh's
    ``dp_shard`` dimension (each expert sharded over ``dims.expert_shard`` ranks, replicated over
    ``dp_replicate``) and route their rows there; returns the expert parameters, which FSDP2 must leave
    alone."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if dims.expert_shard > 1:  # checked before the expert mesh's process groups are made
        check_expert_shards([p.shape[1] for layer in layers for p in layer.expert_params() if p is not None], dims)
        mesh = dims.build_expert_mesh(mesh.device_type)
    names = mesh.mesh_dim_names
    split = {"dp_shard": Shard(0), "ep": Shard(0), "expert_shard": Shard(1)}
    placements = [split.get(name, Replicate()) for name in names]
    group = mesh.get_group("ep" if "ep" in names else "dp_shard")
    shards = mesh.get_group("expert_shard") if "expert_shard" in names else None
    replicas = mesh.get_group("dp_replicate") if "dp_replicate" in names else None
    ignored: set[nn.Parameter] = set()
    for layer in layers:
        experts = {id(p) for p in layer.expert_params() if p is not None}
        for name, param in list(layer.named_parameters()):
            if id(param) not in experts:
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = layer.get_submodule(owner_name)
            split_param = nn.Parameter(distribute_tensor(param.data, mesh, placements),
                                       requires_grad=param.requires_grad)
            owner.register_parameter(attr, split_param)
            ignored.add(split_param)
        layer.run_experts = expert_parallel_run(layer, group, replicas, param_dtype, shards, reshard_after_forward)
    return ignored


def apply_all_ranks_balance(layers: Sequence[nn.Module], group: dist.ProcessGroup | None = None) -> None:
    """``model.moe.lb_loss_scope`` all_ranks or global_batch: each MoE layer's load-balancing loss counts the
    (token, expert) pairs of every rank's micro-batch (an all-reduce of E integers per layer, which compile
    traces)."""
    from torch.distributed._functional_collectives import all_reduce, wait_tensor

    group = group or dist.group.WORLD
    for layer in layers:
        if layer.lb_loss_scope in ("all_ranks", "global_batch"):
            layer.all_ranks_counts = lambda counts: wait_tensor(all_reduce(counts, "sum", group))
