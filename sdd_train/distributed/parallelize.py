"""Apply activation checkpointing, torch.compile and FSDP2 to a model, as the model describes it.

The model hands over a :class:`ModelPlan` (the transformer's ``parallel_plan()``): its blocks, its
root, the root methods to replace under compile and the output types FSDP2 must see into; the mesh's
shape comes from the world's :class:`~sdd_train.distributed.dims.ParallelDims`. Nothing here
imports the model.

Order matters and follows torchtitan: activation checkpointing wraps a block's forward, compile
compiles that forward (so recomputation is inside the graph; under expert parallelism, whose
all-to-all breaks the graph, the checkpoint wraps the compiled forward instead), and FSDP2 shards
each block and then the root. Only methods are replaced (blocks' ``forward``, the root's compiled methods), never
an attribute a forward reads, so parameter names (and therefore checkpoints) are identical with and
without any of the three.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sdd_train.config import ParallelConfig
from sdd_train.kernels import grouped_mm  # noqa: F401  (registers sdd_train::expert_mm, which selective AC keeps)
from sdd_train.kernels.precision import DTYPES
from sdd_train.distributed.dims import ParallelDims
from sdd_train.distributed.expert_parallel import apply_all_ranks_balance, apply_expert_parallel
from sdd_train.distributed.param_cast import apply_param_cast


class ModelPlan(Protocol):
    """What a model hands :func:`parallelize`."""

    @property
    def blocks(self) -> Sequence[nn.Module]:
        """The repeated units, in order: each is checkpointed (those ``parallel.*`` chooses), compiled and
        sharded on its own."""

    @property
    def root(self) -> nn.Module:
        """The whole model, sharded last: its parameters outside the blocks (embedding, final norm, head)."""

    @property
    def compiled_methods(self) -> Mapping[str, Callable[..., Any]]:
        """Methods of the root replaced, under compile, by their compiled versions (the fused loss)."""

    @property
    def output_types(self) -> Sequence[type]:
        """The dataclasses the forwards return, registered as pytree nodes for FSDP2."""

    @property
    def expert_layers(self) -> Sequence[nn.Module]:
        """The MoE layers (``run_experts``, ``expert_params``), whose experts expert parallelism splits."""


def checkpointed_blocks(n_layers: int, mode: str, every: int) -> list[int]:
    if mode in ("full", "selective"):
        return list(range(n_layers))
    if mode == "every_n":
        return list(range(0, n_layers, every))
    return []


def _saved_by_selective_checkpointing() -> set:
    """The operators whose outputs ``selective`` keeps: matrix products and attention (SDPA, flash-attn,
    FlexAttention: the FLOPs), and expert parallelism's collectives (not sent again); the rest (norms, SwiGLU,
    RoPE, residual adds) is recomputed in backward."""
    aten, ops = torch.ops.aten, []
    for name in ("mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward"):
        if hasattr(aten, name):
            ops.append(getattr(aten, name).default)
    for namespace, names in (("flash_attn", ("_flash_attn_forward", "_flash_attn_varlen_forward")),
                             ("_c10d_functional", ("all_to_all_single", "wait_tensor", "all_reduce"))):
        for name in names:  # flash-attn's ops exist once the package is imported; the collectives: expert parallelism's
            op = getattr(getattr(torch.ops, namespace), name, None) if hasattr(torch.ops, namespace) else None
            if op is not None and hasattr(op, "default"):
                ops.append(op.default)
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    return {*ops, *([flex] if flex is not None else []), torch.ops.sdd_train.expert_mm.default}


def _selective_context_fn() -> Callable[[], Any]:
    """The ``context_fn`` every checkpointed forward calls (the operator set is built once, here)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _saved_by_selective_checkpointing()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def apply_activation_checkpointing(plan: ModelPlan, mode: str, every: int) -> list[int]:
    """Recompute the chosen blocks' activations in backward instead of storing them (``selective``:
    all but the outputs of matrix products and attention)."""
    chosen = checkpointed_blocks(len(plan.blocks), mode, every)
    extra = {"context_fn": _selective_context_fn()} if mode == "selective" else {}
    for i in chosen:
        block = plan.blocks[i]
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, **extra)
    return chosen


def apply_compile(plan: ModelPlan, fullgraph: bool = True, backend: str = "inductor") -> None:
    """Compile every block's forward with fullgraph=True (a graph break is an error, not a slowdown),
    and put the root's compiled methods in place (the fused chunked loss's softmax-gradient kernel).

    Blocks of one scheme share code, so dynamo compiles one graph and reuses it for every layer. Under
    expert parallelism the experts' all-to-all runs eagerly between graphs (``fullgraph=False``).
    Shapes are static (``dynamic=False``): training runs one shape, and another one (a short
    validation batch) gets its own graph instead of turning the sizes symbolic, which torch 2.11's
    dynamo cannot trace through the CPU attention's span loop.
    """
    for block in plan.blocks:
        block.forward = torch.compile(block.forward, fullgraph=fullgraph, dynamic=False, backend=backend)
    for name, method in plan.compiled_methods.items():
        setattr(plan.root, name, method)


def _flatten_dataclass(out: Any) -> tuple[list[Any], type]:
    return [getattr(out, f.name) for f in dataclasses.fields(out)], type(out)  # the class is the context


def _unflatten_dataclass(values: list[Any], cls: type) -> Any:
    return cls(*values)


def register_output_types(types: Sequence[type]) -> None:
    """Make the model's output dataclasses (a ``LossOutput``) pytree nodes. FSDP2 puts its pre-backward
    hook (which all-gathers a module's parameters again before its backward) on the tensors of the
    module's output; before torch 2.13 it finds them with pytree, which takes a dataclass for one opaque
    leaf, so the root's resharded parameters (embedding, final norm, head) stayed freed in backward."""
    from torch.utils import _pytree as pytree

    for cls in types:
        if cls not in pytree.SUPPORTED_NODES:
            pytree.register_pytree_node(cls, _flatten_dataclass, _unflatten_dataclass)


def apply_fsdp(plan: ModelPlan, par: ParallelConfig, mesh, device_type: str,
               ignored: set[nn.Parameter] = frozenset()) -> None:
    """Shard every block, then the root (embedding, final norm, head), over ``mesh``: 1-D (FSDP2) or 2-D
    (HSDP); the ``ignored`` parameters (experts split by expert parallelism) stay as they are.

    Parameters are all-gathered in ``parallel.param_dtype`` (:data:`sdd_train.kernels.precision.DTYPES`)
    and gradients reduced in fp32 into fp32 shards, the optimizer's master weights. One process gets
    the same bf16 parameters from :func:`sdd_train.distributed.param_cast.apply_param_cast`. Forward
    inputs are not cast: the blocks get the RoPE table in fp32 (FSDP2's default would cast it to bf16).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=DTYPES[par.param_dtype], reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    register_output_types(plan.output_types)
    blocks, root = plan.blocks, plan.root
    leave_out = {"ignored_params": set(ignored)} if ignored else {}  # the argument is torch >= 2.7's
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away in backward: keep them gathered.
        reshard = par.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard, **leave_out)
    fully_shard(root, mesh=mesh, mp_policy=mp, reshard_after_forward=par.reshard_after_forward, **leave_out)
    if device_type == "cpu":
        # gloo's reduce-scatter with ReduceOp.AVG summed without dividing in torch 2.8 (2-rank
        # gradients came out 2x); SUM and FSDP2's own division by the world size are right everywhere.
        for module in (*blocks, root):
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)


def compile_enabled(setting: bool | None, device: torch.device) -> bool:
    """``train.compile``: an explicit true / false, or null for the default: compile on GPUs only."""
    return setting if setting is not None else device.type == "cuda"


def apply_checkpointing_and_compile(plan: ModelPlan, par: ParallelConfig, compiled: bool, fullgraph: bool,
                                    backend: str = "inductor") -> list[int]:
    """Checkpoint and compile the blocks; returns the checkpointed ones.

    A block that compiles to one graph is compiled with its checkpoint inside, so AOTAutograd plans the
    recomputation. Where the block's graphs break (at expert parallelism's all-to-all), dynamo runs a
    checkpoint inside them eagerly, and its recomputation in backward would run eager kernels, not the
    forward's compiled ones: there the checkpoint wraps the compiled block instead, and backward
    recomputes with the same graphs (bitwise what a run without checkpointing computes). ``selective``'s
    policy there sees the operators the compiled code calls: the expert GEMMs (and attention where inductor
    calls its kernel) are kept; the matrix products inductor writes into its own buffers (``mm.out``) are
    recomputed, as a cached result cannot fill the buffer the recomputed code passes."""
    if compiled and not fullgraph:
        apply_compile(plan, fullgraph=False, backend=backend)
    chosen = apply_activation_checkpointing(plan, par.activation_checkpointing, par.ac_every)
    if compiled and fullgraph:
        apply_compile(plan, fullgraph=True, backend=backend)
    return chosen


def parallelize(plan: ModelPlan, par: ParallelConfig, dims: ParallelDims, device: torch.device,
                compile: bool | None, compile_backend: str = "inductor") -> list[int]:
    """AC and compile (one graph per block, but for expert parallelism's all-to-all), then expert parallelism
    and FSDP2 (only over more than one rank; one process casts parameters as FSDP2 does for
    ``parallel.param_dtype=bf16``). Returns the checkpointed blocks."""
    chosen = apply_checkpointing_and_compile(plan, par, compile_enabled(compile, device), fullgraph=dims.ep == 1,
                                             backend=compile_backend)
    if dims.sharded:
        mesh = dims.build_mesh(device.type)
        experts = (apply_expert_parallel(plan.expert_layers, mesh, dims, DTYPES[par.param_dtype],
                                         par.reshard_after_forward) if dims.ep > 1 else set())
        apply_all_ranks_balance(plan.expert_layers)
        apply_fsdp(plan, par, mesh, device.type, experts)
    elif DTYPES[par.param_dtype] != torch.float32:
        apply_param_cast(plan.root, [*plan.blocks, plan.root], DTYPES[par.param_dtype])
    return chosen


def is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())
