"""The train module: the model and its optimizer, and the math of one training step.

It builds the model on the meta device, parallelises it (activation checkpointing, compile,
FSDP2 with more than one rank), materialises and initialises it identically for every world size,
and runs a step: the forward and backward of this rank's micro-batches under the run's precision
(:func:`sdd_train.kernels.autocast`), the global gradient norm and clipping, the learning rate of
the step and the optimizer update. The loop decides only whether an update happens; callbacks see
the model through the module's methods (evaluation, statistics, FLOPs), never its attributes.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.profiler import record_function

from sdd_train.checkpoint import Checkpointer
from sdd_train.config import RunConfig
from sdd_train.diagnostics.activations import activation_stats
from sdd_train.diagnostics.layer_stats import LayerStats, replica_count
from sdd_train.distributed.parallelize import parallelize
from sdd_train.distributed.world import World, all_reduce_max, all_reduce_sum
from sdd_train.eval.downstream import DownstreamTask, evaluate_tasks
from sdd_train.eval.validation import EvalSet, evaluate_sets
from sdd_train.kernels import autocast, sums_of_squares, upcast
from sdd_train.kernels.precision import bf16_products_of_bf16_values
from sdd_train.model import Transformer
from sdd_train.model.moe import MoE
from sdd_train.train.optim import build_optimizer
from sdd_train.train.schedules import lr_at


@dataclass(eq=False)
class StepOutput:
    """One training step, global over ranks: what callbacks see and what the run log records.

    The values stay on the device: each read of one waits for the device (on a GPU, the next step's
    launches stop overlapping this step's work), so the first one that a decision or a record needs
    reads them all at once and the step's others are free. A step that needs none reads nothing.
    """

    losses: torch.Tensor  # [cross-entropy, z-loss, MoE load balancing, MoE router z-loss], token means
    z_loss: bool = False  # whether the run has the logits z-loss term
    expert_load: torch.Tensor | None = None  # [layers, experts] routed pairs summed over the step and ranks
    router_logit_rms: torch.Tensor | None = None  # [layers] mean over the step's micro-batches and ranks
    grad_norm_tensor: torch.Tensor | None = None  # global, before clipping: set before any callback sees the step
    lr: float = math.nan
    step_time: float = math.nan  # seconds, from reading the batch to the end of the update
    carried: dict[str, torch.Tensor] = field(default_factory=dict)  # callbacks' device scalars (Trainer.read_with_step)
    _values: list[float] | None = field(default=None, init=False, repr=False)

    def read(self) -> list[float]:
        """The losses, the gradient norm and the carried values as floats: one device read per step, whoever
        asks first."""
        if self._values is None:
            scalars = [self.grad_norm_tensor, *self.carried.values()]
            self._values = torch.cat([self.losses.double(), *(t.double().reshape(1) for t in scalars)]).tolist()
        return self._values

    def carried_value(self, name: str) -> float:
        return self.read()[len(self.losses) + 1 + list(self.carried).index(name)]

    @property
    def loss(self) -> float:
        """Token-mean cross-entropy over the global batch."""
        return self.read()[0]

    @property
    def grad_norm(self) -> float:
        return self.read()[4]

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)

    @property
    def metrics(self) -> dict[str, float]:
        """``z_loss`` (when the run has it), ``moe_lb_loss`` and ``moe_router_z_loss`` (MoE models)."""
        values = self.read()
        metrics = {"z_loss": values[1]} if self.z_loss else {}
        if self.expert_load is not None:
            metrics["moe_lb_loss"], metrics["moe_router_z_loss"] = values[2], values[3]
        return metrics

    def expert_load_metrics(self) -> dict[str, float]:
        """``moe/layer_<i>/load_min|load_max|load_entropy`` (empty for dense models)."""
        return expert_load_stats(self.expert_load) if self.expert_load is not None else {}


def expert_load_stats(loads: torch.Tensor) -> dict[str, float]:
    """Min/max routed pairs per expert and the entropy of each layer's load (1 = perfectly balanced),
    from ``[layers, experts]`` counts: every layer at once, in one read."""
    counts = loads.double()  # integer counts: exact in float64
    share = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    entropy = -(share * share.clamp(min=1e-30).log()).sum(-1) / math.log(loads.shape[-1])
    rows = torch.stack([counts.amin(-1), counts.amax(-1), entropy], 1).tolist()
    return {f"moe/layer_{i}/{k}": v for i, (low, high, ent) in enumerate(rows)
            for k, v in (("load_min", int(low)), ("load_max", int(high)), ("load_entropy", ent))}


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients (exact over FSDP shards and meshes: the same in one process and on N
    ranks, to fp32 rounding), then clip to ``max_norm``.

    Clipping is on the device whatever the norm: a non-finite norm makes non-finite (or zero)
    gradients, and such a step's update is dropped anyway (the stability callback), so no read of
    the norm is needed here.
    """
    with_grads = [p for p in params if p.grad is not None]
    # every rank's squares of its own elements, each element counted once over the world (divided by the ranks
    # that hold it), in one all-reduce; summed in the parameters' order, so that the norm does not depend on
    # anything else (grouped by mesh object, a run after another in the same process summed in another order)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    by_replicas: dict[int, list[torch.Tensor]] = {}
    for p in with_grads:
        local = p.grad.to_local() if type(p.grad).__name__ == "DTensor" else p.grad
        by_replicas.setdefault(replica_count(p, world), []).append(upcast(local))
    device = params[0].device if params else None
    squares = sum((sums_of_squares(grads).sum() / n for n, grads in by_replicas.items()),
                  torch.zeros((), device=device))
    total = all_reduce_sum(squares).sqrt()
    if max_norm < math.inf:
        by_mesh: dict[int, list[torch.Tensor]] = {}  # DTensors of different meshes do not mix in one op
        for p in with_grads:
            by_mesh.setdefault(id(getattr(p, "device_mesh", None)), []).append(p)
        for group in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


class TrainModule:
    def __init__(self, cfg: RunConfig, world: World, fake: FakeTensorMode | None = None):
        """``fake``: materialise the model and its optimizer under this fake-tensor mode (shapes without
        storage, left uninitialised), as the memory estimate does; the model is built and parallelised
        outside it."""
        t = cfg.train
        self.cfg, self.world = cfg, world
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
            torch.use_deterministic_algorithms(True)
        # Built on the meta device, parallelised, then materialised and initialised: with FSDP2 no
        # rank ever holds the full model, and the values are the same for every world size.
        with torch.device("meta"):
            model = Transformer(cfg.model)
        self.checkpointed_blocks = parallelize(model.parallel_plan(), cfg.parallel, world.dims, world.device, t.compile,
                                               t.compile_backend)
        with fake or contextlib.nullcontext():
            model.to_empty(device=world.device)
            if fake is None:  # fake tensors hold no values to initialise
                torch.manual_seed(t.seed)
                model.init_weights()
            self.optimizer = build_optimizer(model, cfg.optim)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.moe_layers = [m for m in model.modules() if isinstance(m, MoE)]  # in the order of the load rows
        self.max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (1-based): a pure function of it, so a resumed
        run needs no scheduler state."""
        t = self.cfg.train
        return lr_at(step - 1, self.cfg.optim, t.max_steps, t.global_batch_size * t.seq_len)

    def train_batch(self, micro_batches: Iterable[dict[str, torch.Tensor]], accum: int, step: int) -> StepOutput:
        """Forward and backward of this rank's ``accum`` micro-batches for optimizer step ``step``,
        gradients accumulated (clipped by :meth:`clip_gradients`).

        Every micro-batch has the same token count, so the mean of the per-rank means is the token
        mean, and FSDP2 averages gradients over ranks: the loss is scaled by 1 / accum here.
        """
        t, o, world = self.cfg.train, self.cfg.optim, self.world
        sharded = world.distributed
        # [cross-entropy, logits z-loss, MoE load balancing, MoE router z-loss], summed over micro-batches
        sums = torch.zeros(4, device=world.device)
        loads = logit_rms = None
        # lb_loss_scope=global_batch: every rank's pairs of the step's micro-batches so far, per MoE layer
        earlier = self.zero_step_counts() if self.cfg.model.moe.lb_loss_scope == "global_batch" else None
        # under bf16 on CPU the step's fp32 products of bf16 values run in oneDNN's bf16 mode, exactly
        with bf16_products_of_bf16_values(world.device) if t.precision == "bf16" else contextlib.nullcontext():
            batches = iter(micro_batches)
            for micro in range(accum):
                with record_function("data"):  # the step's phases, as a profiler trace names them
                    batch = next(batches)
                if sharded and self.cfg.parallel.defer_grad_sync:
                    self.model.set_requires_gradient_sync(micro == accum - 1)
                with record_function("forward"), autocast(world.device, t.precision):
                    documents = batch.get("attention_mask", batch.get("doc_ids"))  # the feed's mask, or the ids
                    out = self.model(batch["inputs"], documents, targets=batch["targets"],
                                     z_loss=o.z_loss, loss_chunk=t.loss_chunk_size, earlier_counts=earlier)
                if out.balance_counts is not None:
                    earlier = earlier + out.balance_counts
                parts = [out.ce.detach(), out.z_loss.detach() if out.z_loss is not None else out.ce.new_zeros(())]
                if out.expert_load is not None:
                    parts += [out.moe_lb_loss.detach(), out.moe_router_z_loss.detach()]
                    loads = out.expert_load if loads is None else loads + out.expert_load
                    logit_rms = out.router_logit_rms if logit_rms is None else logit_rms + out.router_logit_rms
                with record_function("backward"):
                    (out.loss / accum).backward()
                sums[: len(parts)] += torch.stack(parts).float()
        # the routers' logit RMS rides along in the losses' all-reduce: one collective for both
        reduced = all_reduce_sum(sums if logit_rms is None else torch.cat([sums, logit_rms.float()]))
        means = reduced / (accum * world.world_size)
        return StepOutput(losses=means[:4], z_loss=o.z_loss > 0, lr=self.lr(step),
                          expert_load=all_reduce_sum(loads) if loads is not None else None,
                          router_logit_rms=means[4:] if logit_rms is not None else None)

    def zero_step_counts(self) -> torch.Tensor | None:
        """[MoE layers, experts] zeros: the pairs counted before a step's first micro-batch (a tensor rather
        than None, so a compiled forward sees one input type in every micro-batch); None for a dense model."""
        if not self.moe_layers:
            return None
        return torch.zeros(len(self.moe_layers), self.moe_layers[0].n_experts, device=self.world.device)

    def clip_gradients(self, out: StepOutput) -> None:
        """Clip the gradients to ``optim.grad_clip``; ``out`` gets the global pre-clip norm (on the device)."""
        out.grad_norm_tensor = grad_norm_and_clip(self.params, self.max_norm)

    def optim_step(self, out: StepOutput) -> None:
        """Update the parameters with the step's learning rate (``out.lr``)."""
        for group in self.optimizer.param_groups:
            group["lr"] = out.lr * group.get("lr_scale", 1.0)
        with record_function("optimizer"):
            self.optimizer.step()
            self.model.project_weights_()  # the scheme's weight constraints (nGPT's unit rows); else nothing
        rate = self.cfg.model.moe.bias_update_rate
        if rate > 0 and out.expert_load is not None:  # auxiliary-loss-free balancing, from the step's global load
            for layer, load in zip(self.moe_layers, out.expert_load):
                layer.balance(load, rate)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ its state

    def save(self, checkpointer: Checkpointer, step: int, meta: dict[str, Any]) -> Path:
        """The model and the optimizer (each rank its shards), with the loop's ``meta``, as step ``step``."""
        with record_function("checkpoint"):
            return checkpointer.save(step, self.model, self.optimizer, meta)

    def load(self, checkpointer: Checkpointer, path: Path) -> dict[str, Any]:
        """Restore the model and the optimizer from ``path`` (resharded to this world); its meta.json."""
        return checkpointer.load(path, self.model, self.optimizer)

    # ------------------------------------------------------------------ for callbacks and the loop

    def describe(self, seq_len: int) -> str:
        return self.model.describe(seq_len)

    def deferred_gradient_bytes(self, accum: int) -> int:
        """What ``parallel.defer_grad_sync`` costs each rank: with FSDP2 and several micro-batches a
        step, every parameter's gradient is held unsharded in fp32 until the step's last micro-batch
        reduce-scatters it (0 where nothing is deferred); experts split by expert parallelism hold only
        the rank's share of their gradients."""
        if not (self.world.distributed and accum > 1 and self.cfg.parallel.defer_grad_sync):
            return 0
        ep = self.world.dims.ep
        experts = sum(p.numel() for layer in self.moe_layers for p in layer.expert_params() if p is not None)
        experts = experts if ep > 1 else 0
        return 4 * (self.model.param_counts().total - experts + experts // self.world.dims.dp_shard)

    def num_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward and backward) of the whole model, for MFU."""
        return self.model.flops_per_token(seq_len)

    def parameters_finite(self) -> bool:
        """Every parameter on every rank is finite (one all-reduce, one read)."""
        bad = torch.zeros((), device=self.world.device)
        for p in self.model.parameters():
            local = p.to_local() if type(p).__name__ == "DTensor" else p
            if not torch.isfinite(local).all():
                bad.fill_(1.0)
                break
        return all_reduce_max(bad).item() == 0

    def evaluate(self, eval_sets: list[EvalSet]) -> dict[str, float]:
        """Validation losses of the model as it is now (``val/<name>/loss``, ``val_loss``)."""
        t = self.cfg.train
        return evaluate_sets(self.model, eval_sets, self.world, t.precision, t.loss_chunk_size)

    def evaluate_downstream(self, tasks: list[DownstreamTask]) -> dict[str, float]:
        """OLMo's downstream metrics of the model as it is now (``downstream/<task>[/<metric>]``)."""
        return evaluate_tasks(self.model, tasks, self.world, self.cfg)

    def activation_stats(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Residual-stream RMS after every block and the layer similarity on ``batch``."""
        batch = {k: v.to(self.world.device) for k, v in batch.items()}
        return activation_stats(self.model, batch["inputs"], batch.get("doc_ids"), self.cfg.train.precision)

    def layer_stats(self) -> LayerStats:
        """Per-layer norms of gradients, parameters and updates of this module's model."""
        return LayerStats(self.model, self.world.world_size)
