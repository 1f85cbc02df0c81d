"""The training loop: one process (``sdd-train``) or many (``torchrun``), the same code.

The loop sees a plain :class:`Transformer` to which :func:`parallelize` has applied activation
checkpointing, compile and (with more than one rank) FSDP2. A run directory holds
``config.yaml``, ``metrics.jsonl`` and ``checkpoints/``; running the same command again
resumes from the latest checkpoint, with any number of ranks.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch

from sdd_train.config import ConfigError, RunConfig, as_dict, save_config
from sdd_train.data.corpus import load_stdlib_corpus
from sdd_train.data.dataset import PreparedDataset
from sdd_train.data.loader import MixtureLoader, Prefetcher, open_datasets
from sdd_train.data.sources import DataError
from sdd_train.diagnostics.activations import activation_stats
from sdd_train.diagnostics.layer_stats import LayerStats
from sdd_train.diagnostics.spikes import Spike, SpikeDetector
from sdd_train.eval.validation import EvalSet, build_eval_sets, evaluate_sets
from sdd_train.kernels.precision import bf16_products_of_bf16_values
from sdd_train.model import Transformer
from sdd_train.model.moe import load_stats
from sdd_train.train.checkpoint import Checkpointer, checkpoint_dir, latest
from sdd_train.train.distributed import (World, all_reduce_max, all_reduce_sum, barrier, broadcast_object, close_world,
                                        data_parallel_shape, init_world)
from sdd_train.train.metrics import RunLog, WandbLog, format_line, import_wandb
from sdd_train.train.optim import build_optimizer, lr_at
from sdd_train.train.parallelize import parallelize

# Peak dense bf16 FLOP/s per device, for MFU when train.peak_tflops is not set (SPEC section 9).
PEAK_TFLOPS = {"H100": 989.5, "H200": 989.5, "A100": 312.0}


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/Inf; nothing non-finite is checkpointed."""


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe(model: Transformer, cfg: RunConfig) -> str:
    m = cfg.model
    counts = model.param_counts()
    flops = model.flops_per_token(cfg.train.seq_len)
    ffn = (f"moe {m.moe.n_experts} experts top-{m.moe.top_k} x {m.moe.expert_hidden}" if m.ffn == "moe"
           else f"ffn={m.ffn_hidden}")
    active = f", {counts.active:,} active (MoE, without the embedding lookup)" if m.ffn == "moe" else ""
    return (
        f"model: block={m.block} init={model.init_scheme} d={m.d_model} L={m.n_layers}"
        f" heads={m.n_heads}/{m.n_kv_heads} {ffn} vocab={m.vocab_size}\n"
        f"params: {counts.total:,} total, {counts.non_embedding:,} non-embedding{active};"
        f" {flops / 1e9:.3f} GFLOPs/token (train, seq {cfg.train.seq_len})"
    )


def peak_tflops(cfg_value: float | None, device: torch.device) -> float | None:
    if cfg_value is not None:
        return cfg_value
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or this process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients (exact over FSDP shards), then clip to ``max_norm`` if finite."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if type(total).__name__ == "DTensor":  # partial norms of the shards -> one global value
        total = total.full_tensor()
    if max_norm < math.inf and torch.isfinite(total):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


class StopSignal:
    """SIGTERM / SIGUSR1 (Slurm preemption) ask the loop to checkpoint and exit at the next step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum


def _check_world(cfg: RunConfig, world: World) -> None:
    """The checks that need the world size, before any work starts."""
    t = cfg.train
    data_parallel_shape(cfg.parallel, world.world_size)
    per_step = world.world_size * t.micro_batch_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of world_size ({world.world_size})"
            f" x train.micro_batch_size ({t.micro_batch_size}); change either so every rank gets whole micro-batches"
        )
    if cfg.logging.wandb != "disabled" and world.is_main:
        import_wandb(cfg.logging.wandb)


def open_run_data(cfg: RunConfig, world: World, log) -> tuple[list[PreparedDataset], list[str]]:
    """The training datasets and their names. For the stdlib corpus rank 0 builds the cache first."""
    if cfg.data.source == "stdlib":
        corpus = load_stdlib_corpus(cfg.data, log=log) if world.is_main else None
        barrier()
        corpus = corpus or load_stdlib_corpus(cfg.data, log=lambda *a: None)
        return [corpus], ["stdlib"]
    datasets = open_datasets([d.path for d in cfg.data.datasets])
    names = [d.name or Path(d.path).name for d in cfg.data.datasets]
    for name, ds in zip(names, datasets):
        log(f"data: {name}: {len(ds.train):,} train / {len(ds.val):,} val tokens ({ds.root})")
    return datasets, names


def _all_finite(model: torch.nn.Module) -> bool:
    bad = torch.zeros((), device=next(model.parameters()).device)
    for p in model.parameters():
        local = p.to_local() if type(p).__name__ == "DTensor" else p
        if not torch.isfinite(local).all():
            bad.fill_(1.0)
            break
    return all_reduce_max(bad).item() == 0


def train(cfg: RunConfig, log=print) -> Path:
    """Train ``cfg`` to ``train.max_steps`` (resuming if a checkpoint exists); return the run directory."""
    world = init_world(cfg.train.device)
    try:
        return Trainer(cfg, world, log if world.is_main else (lambda *a, **k: None)).run()
    except DataError as e:  # bad data is a usage error (exit 2), found before training starts
        raise ConfigError(f"data: {e}") from None
    finally:
        close_world()


class Trainer:
    def __init__(self, cfg: RunConfig, world: World, log) -> None:
        _check_world(cfg, world)
        self.cfg, self.world, self.log = cfg, world, log
        t = cfg.train
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
            torch.use_deterministic_algorithms(True)
        self.run_dir = cfg.resolved_run_dir
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.datasets, self.dataset_names = open_run_data(cfg, world, log)
        tokenizer = self.datasets[0].tokenizer
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's"
                              f" {tokenizer.vocab_size} pieces ({tokenizer.model_file})")
        weights = [d.weight for d in cfg.data.datasets] if cfg.data.source == "prepared" else [1.0]
        self.loader = MixtureLoader([d.train for d in self.datasets], weights, t.seq_len, t.seed, tokenizer.eos_id,
                                    self.dataset_names, cfg.data.doc_mask)
        self.data_fingerprint = [d.fingerprint for d in self.datasets]

        # Build on the meta device, parallelise, then materialise and initialise: with FSDP2 no rank
        # ever holds the full model, and the values are the same for every world size.
        with torch.device("meta"):
            model = Transformer(cfg.model)
        self.checkpointed = parallelize(model, cfg.parallel, world, t.precision, t.compile)
        model.to_empty(device=world.device)
        torch.manual_seed(t.seed)
        model.init_weights()
        self.model = model
        self.sharded = world.distributed
        self.use_autocast = t.precision == "bf16" and not self.sharded  # FSDP2 casts parameters itself
        self.optimizer = build_optimizer(model, cfg.optim)
        self.checkpointer = Checkpointer(self.run_dir, world, keep=t.keep_checkpoints,
                                         permanent_every=t.permanent_checkpoint_interval, async_save=t.async_checkpoint)
        self.layer_stats = LayerStats(model, world.world_size) if cfg.diagnostics.layer_stats_interval else None
        self.spikes = SpikeDetector(cfg.diagnostics.spike)
        self.rollbacks, self.spike_skips = 0, 0
        self.step, self.skipped, self.consumed = 0, 0, 0
        self.data_skips: set[int] = set()  # stream positions of batches a rollback excluded
        self.out: RunLog | None = None  # rank 0's record streams, opened by run()
        self.prefetch: Prefetcher | None = None
        resume = broadcast_object(latest(self.run_dir))
        if resume is not None:
            meta = self.checkpointer.load(resume, model, self.optimizer)
            self._restore(meta)
            self.rollbacks = meta.get("rollbacks", 0)
            if meta.get("data", {}).get("fingerprints", self.data_fingerprint) != self.data_fingerprint:
                log("warning: the training data changed since this checkpoint; continuing at the same stream position")
            log(f"resume: from {resume} (step {self.step}, {self.consumed:,} instances consumed,"
                f" written by {meta['world_size']} rank(s))")
        log(describe(model, cfg))
        self.peak = peak_tflops(t.peak_tflops, world.device)
        self.flops_per_token = model.flops_per_token(t.seq_len)

    def _restore(self, meta: dict) -> None:
        """Trainer state from a checkpoint's meta.json (model and optimizer are loaded by the Checkpointer)."""
        data = meta.get("data", {})
        self.step, self.skipped = meta["step"], meta.get("skipped_steps", 0)
        self.consumed = data.get("instances_consumed", self.step * self.cfg.train.global_batch_size)
        self.data_skips = set(data.get("skipped_positions", []))
        self.spike_skips = meta.get("spike_skips", 0)
        self.spikes.load_state_dict(meta.get("spike_detector", {}))

    def _next_position(self, position: int) -> int:
        """The first stream position at or after ``position`` whose batch was not excluded by a rollback."""
        while position in self.data_skips:
            position += self.cfg.train.global_batch_size
        return position

    # ------------------------------------------------------------------ loop

    def run(self) -> Path:
        cfg, t, world, log = self.cfg, self.cfg.train, self.world, self.log
        diag = cfg.diagnostics
        per_rank = t.global_batch_size // world.world_size
        accum = per_rank // t.micro_batch_size
        tokens_per_step = t.global_batch_size * t.seq_len
        par = "" if not world.distributed else f", FSDP2 over {world.world_size} ranks"
        ac = f", activation checkpointing on {len(self.checkpointed)} blocks" if self.checkpointed else ""
        log(f"train: {t.max_steps} steps x {tokens_per_step:,} tokens ({accum} micro-batches of {t.micro_batch_size}"
            f" x {t.seq_len} per rank), {t.precision} on {world.device}{par}{ac}, run dir {self.run_dir}")
        if self.step >= t.max_steps:
            log(f"train: already complete at step {self.step}")
            return self.run_dir
        bar = _progress_bar(cfg, world, self.step)
        say = bar.write if bar is not None else log
        wandb = (WandbLog(cfg.logging, self.run_dir, cfg.name, as_dict(cfg))
                 if world.is_main and cfg.logging.wandb != "disabled" else None)
        self.out = RunLog(self.run_dir, self.step, wandb, say) if world.is_main else None

        eval_sets = self._eval_sets()
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        consecutive_skips = 0
        max_grad_norm = 0.0  # since the last logged record (spikes between log steps stay visible)
        self.prefetch = (Prefetcher(self.loader.batch, pin_memory=world.device.type == "cuda") if cfg.data.prefetch
                         else None)
        start_step = self.step
        last_time, last_step, run_start = time.perf_counter(), self.step, time.perf_counter()
        try:
            with StopSignal() as stop:
                while self.step < t.max_steps:
                    step = self.step + 1  # the step this update makes
                    lr = lr_at(self.step, cfg.optim, t.max_steps, tokens_per_step)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    log_step = step % t.log_interval == 0 or step in (t.max_steps, start_step + 1)
                    stats_step = self.layer_stats is not None and (step % diag.layer_stats_interval == 0
                                                                    or step == t.max_steps)
                    self.consumed = self._next_position(self.consumed)
                    with self._bf16_products():
                        loss, extra = self._forward_backward(accum, per_rank, log_step)
                    stats = self.layer_stats.gradients() if stats_step else {}  # before clipping
                    grad_norm = grad_norm_and_clip(params, max_norm)
                    finite = math.isfinite(loss) and bool(torch.isfinite(grad_norm))
                    if finite:
                        max_grad_norm = max(max_grad_norm, grad_norm.item())
                    spikes = self.spikes.check(loss, grad_norm.item()) if finite and self.spikes.enabled else []
                    action = self._spike_action(step, loss, grad_norm.item(), spikes) if spikes else "apply"
                    if action == "rollback":
                        self.optimizer.zero_grad(set_to_none=True)
                        if bar is not None:
                            bar.n = self.step
                            bar.refresh()
                        last_time, last_step = time.perf_counter(), self.step
                        continue
                    self.step = step
                    self.consumed += t.global_batch_size
                    if finite and action == "apply":
                        before = self.layer_stats.snapshot() if stats_step else None
                        self.optimizer.step()
                        self.spikes.accept(loss, grad_norm.item())
                        consecutive_skips = 0
                        if before is not None:
                            stats.update(self.layer_stats.updates(before))
                            self._write("layer_stats", {"step": step, **stats})
                    elif finite:  # a spike whose update is dropped
                        self.spike_skips += 1
                    else:
                        self._nonfinite(loss, grad_norm.item())
                        self.skipped += 1
                        consecutive_skips += 1
                        self._write("metrics", {"step": step, "loss": loss, "grad_norm": grad_norm.item(),
                                                "skipped": True, "skipped_steps": self.skipped}, console=True)
                        if consecutive_skips >= t.max_nonfinite_skips:
                            raise TrainingDiverged(
                                f"step {step}: {consecutive_skips} consecutive non-finite steps; the run diverged."
                                f" The last good checkpoint (if any) is in {checkpoint_dir(self.run_dir)}")
                    self.optimizer.zero_grad(set_to_none=True)
                    if bar is not None:
                        bar.update(1)

                    if finite and log_step:
                        now = time.perf_counter()
                        steps = step - last_step
                        tok_s = steps * tokens_per_step / (now - last_time)
                        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
                                  "grad_norm_max": max_grad_norm, "tokens_per_sec": tok_s,
                                  "step_time": (now - last_time) / steps,
                                  "peak_mem_gib": peak_memory_gib(world.device),
                                  "eta_s": (t.max_steps - step) * (now - run_start) / max(step - start_step, 1)}
                        if self.peak is not None:
                            record["mfu"] = self.flops_per_token * tok_s / world.world_size / (self.peak * 1e12)
                        record.update(extra)
                        for key in ("skipped", "spike_skips", "rollbacks"):
                            value = getattr(self, key)
                            if value:
                                record["skipped_steps" if key == "skipped" else key] = value
                        self._write("metrics", record, console=True)
                        last_time, last_step, max_grad_norm = time.perf_counter(), step, 0.0
                    if eval_sets and t.eval_batches and t.eval_interval and (step % t.eval_interval == 0
                                                                            or step == t.max_steps):
                        val = evaluate_sets(self.model, eval_sets, world, self._autocast(), t.loss_chunk_size)
                        self._write("metrics", {"step": step, **val}, console=True)
                        last_time = time.perf_counter()  # keep eval time out of tokens/s
                    if eval_sets and diag.activation_interval and (step % diag.activation_interval == 0
                                                                   or step == t.max_steps):
                        self._activations(eval_sets[0].batches[0])
                        last_time = time.perf_counter()
                    stopping = self._stop_requested(stop)
                    interval = t.checkpoint_interval and step % t.checkpoint_interval == 0
                    permanent = t.permanent_checkpoint_interval and step % t.permanent_checkpoint_interval == 0
                    if interval or permanent or step == t.max_steps or stopping:
                        path = self._save()
                        if step == t.max_steps:
                            log(f"checkpoint: {path}")
                        last_time = time.perf_counter()
                    if stopping:
                        name = signal.Signals(stopping).name
                        log(f"stopped by {name} at step {step}; checkpoint {checkpoint_dir(self.run_dir)}."
                            " Re-run the same command to resume.")
                        break
            self.checkpointer.wait()
        finally:
            if self.prefetch is not None:
                self.prefetch.close()
            if bar is not None:
                bar.close()
            if self.out is not None:
                self.out.close()
        return self.run_dir

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast in a single process; under FSDP2 the mixed-precision policy casts instead."""
        return autocast(self.world.device, "bf16" if self.use_autocast else "fp32")

    def _bf16_products(self) -> contextlib.AbstractContextManager:
        """Around a bf16 step's forward and backward: the CPU attention's fp32 products of bf16 values
        run in oneDNN's bf16 fpmath mode, exactly (:func:`bf16_products_of_bf16_values`)."""
        return bf16_products_of_bf16_values(self.world.device) if self.use_autocast else contextlib.nullcontext()

    def _write(self, stream: str, record: dict, console: bool = False, wandb_record: dict | None = None) -> None:
        if self.out is not None:
            line = format_line(record, self.cfg.train.max_steps) if console else None
            self.out.write(stream, record, line, wandb_record)

    def _activations(self, batch: dict[str, torch.Tensor]) -> None:
        """Residual RMS per layer and the layer similarity matrix on the fixed held-out batch."""
        batch = {k: v.to(self.world.device) for k, v in batch.items()}
        stats = activation_stats(self.model, batch["inputs"], batch.get("doc_ids"), self._autocast())
        record = {"step": self.step, **stats}
        rms = {f"act/layer_{i}/rms": v for i, v in enumerate(stats["rms"])}
        self._write("activations", record, wandb_record={"step": self.step, **rms})

    # ------------------------------------------------------------------ loss spikes

    def _spike_action(self, step: int, loss: float, grad_norm: float, spikes: list[Spike]) -> str:
        """Apply ``diagnostics.spike.action`` to a spike; returns apply | skip | rollback (already done)."""
        cfg = self.cfg.diagnostics.spike
        action = cfg.action
        if action == "rollback" and self.rollbacks >= cfg.max_rollbacks:
            action = "skip"
            note = f"; {self.rollbacks} rollbacks already (diagnostics.spike.max_rollbacks), skipping instead"
        else:
            note = ""
        event = {"step": step, "event": "loss_spike", "action": action, "loss": loss, "grad_norm": grad_norm,
                 "position": self.consumed,
                 "triggers": [{"metric": s.metric, "value": s.value, "mean": s.mean, "std": s.std,
                               "threshold": s.threshold} for s in spikes]}
        if action == "rollback":
            target = self._rollback()
            if target is None:
                action, note = "skip", "; no checkpoint to roll back to, skipping instead"
                event["action"] = action
            else:
                event["rolled_back_to"] = target
                event["skipped_positions"] = sorted(p for p in self.data_skips if p >= event["position"])
                note = f"; rolled back to step {target}, skipping {cfg.skip_batches} batch(es) from position" \
                       f" {event['position']}"
        message = f"loss spike at step {step}: " + "; ".join(s.describe() for s in spikes)
        self._write("events", event)
        self.log(f"warning: {message} -> {action}{note}")
        return "apply" if action == "log" else action

    def _rollback(self) -> int | None:
        """Reload the latest checkpoint and exclude the offending batches from the stream; the new step."""
        self.checkpointer.wait()
        path = broadcast_object(latest(self.run_dir))
        if path is None:
            return None
        gbs = self.cfg.train.global_batch_size
        excluded = self.data_skips | {self.consumed + k * gbs for k in range(self.cfg.diagnostics.spike.skip_batches)}
        meta = self.checkpointer.load(path, self.model, self.optimizer)
        self._restore(meta)
        self.data_skips |= excluded
        self.rollbacks += 1
        if self.prefetch is not None:
            self.prefetch.clear()
        if self.out is not None:
            self.out.rollback(self.step)
        return self.step

    def _forward_backward(self, accum: int, per_rank: int, log_step: bool) -> tuple[float, dict[str, float]]:
        """Accumulate gradients over this rank's micro-batches.

        Returns the global mean cross-entropy and the other global metrics of the step (z-loss,
        MoE auxiliary losses, and on logging steps the per-layer expert load).
        """
        t, o, world, moe = self.cfg.train, self.cfg.optim, self.world, self.cfg.model.moe
        is_moe = self.cfg.model.ffn == "moe"
        # [cross-entropy, logits z-loss, MoE load balancing, MoE router z-loss], summed over micro-batches
        sums = torch.zeros(4, device=world.device)
        loads: torch.Tensor | None = None
        starts = [world.rank * per_rank + micro * t.micro_batch_size for micro in range(accum)]
        for micro, start in enumerate(starts):
            if self.sharded and self.cfg.parallel.defer_grad_sync:
                self.model.set_requires_gradient_sync(micro == accum - 1)
            if self.prefetch is not None:
                batch = self.prefetch.get(self.consumed, start, t.micro_batch_size)
                if micro == 0:  # read the next step's micro-batches while this one computes
                    following = self._next_position(self.consumed + t.global_batch_size)
                    for s in starts:
                        self.prefetch.schedule(following, s, t.micro_batch_size)
            else:
                batch = self.loader.batch(self.consumed, start, t.micro_batch_size)
            batch = {k: v.to(world.device, non_blocking=True) for k, v in batch.items()}
            targets = batch["targets"]
            # Every micro-batch has the same token count, so the mean of per-rank means is the token mean;
            # FSDP2 averages gradients over ranks, completing the 1 / (accum x world) scaling.
            with self._autocast():  # the model computes the loss (chunked: the full logits never exist)
                loss, ce, z = self.model(batch["inputs"], batch.get("doc_ids"), targets=targets, z_loss=o.z_loss,
                                         loss_chunk=t.loss_chunk_size)
            parts = [ce.detach(), z.detach() if z is not None else ce.new_zeros(())]
            if is_moe:
                aux = self.model.moe_aux()
                loss = loss + moe.lb_loss_weight * aux["lb_loss"] + moe.z_loss_weight * aux["router_z_loss"]
                parts += [aux["lb_loss"].detach(), aux["router_z_loss"].detach()]
                if log_step:
                    step_load = torch.stack(self.model.moe_load())
                    loads = step_load if loads is None else loads + step_load
            (loss / accum).backward()
            sums[: len(parts)] += torch.stack(parts).float()
        means = (all_reduce_sum(sums) / (accum * world.world_size)).tolist()
        extra: dict[str, float] = {}
        if o.z_loss > 0:
            extra["z_loss"] = means[1]
        if is_moe:
            extra["moe_lb_loss"], extra["moe_router_z_loss"] = means[2], means[3]
            if loads is not None:
                for i, layer in enumerate(all_reduce_sum(loads)):
                    extra.update({f"moe/layer_{i}/{k}": v for k, v in load_stats(layer).items()})
        return means[0], extra

    def _eval_sets(self) -> list[EvalSet]:
        """The validation sets (their first batch is also the fixed batch of the activation statistics)."""
        t = self.cfg.train
        if not ((t.eval_batches and t.eval_interval) or self.cfg.diagnostics.activation_interval):
            return []
        sets = build_eval_sets(self.cfg, self.datasets, self.dataset_names, max(t.eval_batches, 1))
        if not sets:
            self.log(f"warning: no validation split holds {t.seq_len + 1} tokens; in-loop validation is off")
        return sets

    def _nonfinite(self, loss: float, grad_norm: float) -> None:
        message = f"step {self.step}: loss={loss} grad_norm={grad_norm} is not finite"
        self._write("events", {"step": self.step, "event": "nonfinite", "action": self.cfg.train.nonfinite,
                               "loss": loss, "grad_norm": grad_norm})
        if self.cfg.train.nonfinite == "stop":
            raise TrainingDiverged(
                f"{message}; the run diverged. Lower optim.lr, raise optim.warmup_steps, try model.block=sdd,"
                " or set train.nonfinite=skip to drop such steps."
                f" The last good checkpoint (if any) is in {checkpoint_dir(self.run_dir)}")
        self.log(f"warning: {message}; update skipped (train.nonfinite=skip)")

    def _stop_requested(self, stop: StopSignal) -> int:
        """The signal number if any rank received SIGTERM/SIGUSR1 (all ranks agree), else 0."""
        flag = torch.tensor(float(stop.received or 0), device=self.world.device)
        return int(all_reduce_max(flag).item()) if self.world.distributed else int(flag.item())

    def _save(self) -> Path:
        if not _all_finite(self.model):
            raise TrainingDiverged(f"step {self.step}: the model has non-finite parameters; not checkpointing it."
                                   f" The last good checkpoint (if any) is in {checkpoint_dir(self.run_dir)}")
        t = self.cfg.train
        data = {"instances_consumed": self.consumed, "epoch": self.loader.epoch_of(self.consumed),
                "seed": t.seed, "fingerprints": self.data_fingerprint, "skipped_positions": sorted(self.data_skips)}
        meta = {"skipped_steps": self.skipped, "tokens_seen": self.consumed * t.seq_len, "data": data,
                "spike_detector": self.spikes.state_dict(), "spike_skips": self.spike_skips,
                "rollbacks": self.rollbacks, "config": as_dict(self.cfg)}
        return self.checkpointer.save(self.step, self.model, self.optimizer, meta)


def _progress_bar(cfg: RunConfig, world: World, initial: int):
    """A tqdm bar on rank 0 when stdout is a terminal (log lines then print above it)."""
    if not (cfg.logging.progress_bar and world.is_main and sys.stdout.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.train.max_steps, initial=initial, unit="step", dynamic_ncols=True, leave=False)
