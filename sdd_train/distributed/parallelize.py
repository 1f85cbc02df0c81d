"""Apply activation checkpointing, torch.compile and FSDP2 to a plain :class:`Transformer`.

Order matters and follows torchtitan: activation checkpointing wraps a block's forward, compile
compiles that forward (so recomputation is inside the graph), and FSDP2 shards each block and
then the root. Only methods are replaced (blocks' ``forward``, the model's ``chunked_loss``), never
an attribute a forward reads, so parameter names (and therefore checkpoints) are identical with and
without any of the three.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sdd_train.config import ParallelConfig
from sdd_train.kernels.precision import PARAM_DTYPES
from sdd_train.kernels import linear_cross_entropy
from sdd_train.model import LossOutput, Transformer
from sdd_train.distributed.param_cast import apply_param_cast
from sdd_train.distributed.world import World


def checkpointed_blocks(n_layers: int, mode: str, every: int) -> list[int]:
    if mode == "full":
        return list(range(n_layers))
    if mode == "every_n":
        return list(range(0, n_layers, every))
    return []


def apply_activation_checkpointing(model: Transformer, mode: str, every: int) -> list[int]:
    """Recompute the chosen blocks' activations in backward instead of storing them."""
    chosen = checkpointed_blocks(len(model.blocks), mode, every)
    for i in chosen:
        block = model.blocks[i]
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return chosen


def apply_compile(model: Transformer) -> None:
    """Compile every block's forward with fullgraph=True (a graph break is an error, not a slowdown),
    and the fused chunked loss's softmax-gradient kernel.

    Blocks of one scheme share code, so dynamo compiles one graph and reuses it for every layer.
    Shapes are static (``dynamic=False``): training runs one shape, and another one (a short
    validation batch) gets its own graph instead of turning the sizes symbolic, which torch 2.11's
    dynamo cannot trace through the CPU attention's span loop.
    """
    for block in model.blocks:
        block.forward = torch.compile(block.forward, fullgraph=True, dynamic=False)
    model.chunked_loss = functools.partial(linear_cross_entropy, compiled=True)


def _flatten_loss_output(out: LossOutput) -> tuple[list[Any], None]:
    return [getattr(out, f.name) for f in dataclasses.fields(out)], None


def _unflatten_loss_output(values: list[Any], _context: None) -> LossOutput:
    return LossOutput(*values)


def register_output_types() -> None:
    """Make :class:`LossOutput` a pytree node. FSDP2 puts its pre-backward hook (which all-gathers a
    module's parameters again before its backward) on the tensors of the module's output; before
    torch 2.13 it finds them with pytree, which takes a dataclass for one opaque leaf, so the root's
    resharded parameters (embedding, final norm, head) stayed freed in backward."""
    from torch.utils import _pytree as pytree

    if LossOutput not in pytree.SUPPORTED_NODES:
        pytree.register_pytree_node(LossOutput, _flatten_loss_output, _unflatten_loss_output)


def apply_fsdp(model: Transformer, par: ParallelConfig, world: World) -> None:
    """Shard every block, then the root (embedding, final norm, head), over the world's mesh: 1-D (FSDP2) or 2-D (HSDP).

    Parameters are all-gathered in ``parallel.param_dtype`` (:data:`sdd_train.kernels.precision.PARAM_DTYPES`)
    and gradients reduced in fp32 into fp32 shards, the optimizer's master weights. One process gets
    the same bf16 parameters from :func:`sdd_train.distributed.param_cast.apply_param_cast`. Forward
    inputs are not cast: the blocks get the RoPE table in fp32 (FSDP2's default would cast it to bf16).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = world.dims.build_mesh(world.device.type)
    mp = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[par.param_dtype], reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    register_output_types()
    for i, block in enumerate(model.blocks):
        # The last block's parameters are needed again right away in backward: keep them gathered.
        reshard = par.reshard_after_forward and i < len(model.blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=par.reshard_after_forward)
    if world.device.type == "cpu":
        # gloo's reduce-scatter with ReduceOp.AVG summed without dividing in torch 2.8 (2-rank
        # gradients came out 2x); SUM and FSDP2's own division by the world size are right everywhere.
        for module in (*model.blocks, model):
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)


def compile_enabled(setting: bool | None, device: torch.device) -> bool:
    """``train.compile``: an explicit true / false, or null for the default: compile on GPUs only."""
    return setting if setting is not None else device.type == "cuda"


def parallelize(model: Transformer, par: ParallelConfig, world: World, compile: bool | None) -> list[int]:
    """AC, then compile, then FSDP2 (only in a world of more than one; one process casts parameters
    as FSDP2 does for ``parallel.param_dtype=bf16``). Returns the checkpointed blocks."""
    chosen = apply_activation_checkpointing(model, par.activation_checkpointing, par.ac_every)
    if compile_enabled(compile, world.device):
        apply_compile(model)
    if world.distributed:
        apply_fsdp(model, par, world)
    elif PARAM_DTYPES[par.param_dtype] != torch.float32:
        apply_param_cast(model, [*model.blocks, model], PARAM_DTYPES[par.param_dtype])
    return chosen


def is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())
