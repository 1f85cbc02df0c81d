"""Single-process training loop.

The loop only sees a plain ``nn.Module`` and an optimizer; compile (and, later, FSDP2) is applied
to the model before it gets here. A run directory holds ``config.yaml``, ``metrics.jsonl`` and
``checkpoints/``; running the same config again resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from sdd_train.config import ConfigError, RunConfig, save_config
from sdd_train.data.corpus import load_stdlib_corpus
from sdd_train.data.sampler import train_batch, val_batches
from sdd_train.model import Transformer
from sdd_train.train import checkpoint
from sdd_train.train.loss import lm_loss
from sdd_train.train.metrics import MetricsLog, format_line
from sdd_train.train.optim import build_optimizer, lr_at


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/Inf; nothing non-finite is checkpointed."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_blocks(model: Transformer) -> None:
    """torch.compile each block in place (parameter names unchanged); identical blocks share one graph."""
    for block in model.blocks:
        block.compile(fullgraph=True)


def describe(model: Transformer, cfg: RunConfig) -> str:
    counts = model.param_counts()
    flops = model.flops_per_token(cfg.train.seq_len)
    return (
        f"model: block={cfg.model.block} init={model.init_scheme} d={cfg.model.d_model} L={cfg.model.n_layers}"
        f" heads={cfg.model.n_heads}/{cfg.model.n_kv_heads} ffn={cfg.model.ffn_hidden} vocab={cfg.model.vocab_size}\n"
        f"params: {counts.total:,} total, {counts.non_embedding:,} non-embedding;"
        f" {flops / 1e9:.3f} GFLOPs/token (train, seq {cfg.train.seq_len})"
    )


@torch.no_grad()
def evaluate(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             precision: str) -> float:
    """Token-mean validation cross-entropy over fixed batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        with autocast(device, precision):
            logits = model(inputs.to(device))
        _, ce, _ = lm_loss(logits, targets.to(device))
        total += ce.item() * targets.numel()
        count += targets.numel()
    model.train(was_training)
    return total / max(count, 1)


def train(cfg: RunConfig, log=print) -> Path:
    """Train ``cfg`` to ``train.max_steps`` (resuming if a checkpoint exists); return the run directory."""
    t, o = cfg.train, cfg.optim
    run_dir = cfg.resolved_run_dir
    device = resolve_device(t.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    corpus = load_stdlib_corpus(cfg.data, log=log)
    if corpus.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {corpus.tokenizer.vocab_size} pieces"
        )

    torch.manual_seed(t.seed)
    model = Transformer(cfg.model).to(device)
    optimizer = build_optimizer(model, o)
    start_step = 0
    ckpt = checkpoint.latest(run_dir)
    if ckpt is not None:
        state = checkpoint.load(ckpt)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        log(f"resume: from {ckpt} (step {start_step})")
    log(describe(model, cfg))
    accum = t.global_batch_size // t.micro_batch_size
    tokens_per_step = t.global_batch_size * t.seq_len
    log(f"train: {t.max_steps} steps x {tokens_per_step:,} tokens ({accum} micro-batches of {t.micro_batch_size}"
        f" x {t.seq_len}), {t.precision} on {device}, run dir {run_dir}")
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step)
    if start_step >= t.max_steps:
        log(f"train: already complete at step {start_step}")
        return run_dir

    if t.compile:
        compile_blocks(model)
    eval_data = val_batches(corpus.val, t.seq_len, t.micro_batch_size, t.eval_batches) if t.eval_batches else []
    model.train()
    last_log_time, last_log_step = time.perf_counter(), start_step
    for step in range(start_step, t.max_steps):
        lr = lr_at(step, o, t.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        z_sum = torch.zeros((), device=device)
        for micro in range(accum):
            inputs, targets = train_batch(corpus.train, t.seq_len, t.global_batch_size, t.seed, step,
                                          start=micro * t.micro_batch_size, size=t.micro_batch_size)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with autocast(device, t.precision):
                logits = model(inputs)
            loss, ce, z = lm_loss(logits, targets, o.z_loss)
            (loss / accum).backward()
            loss_sum += ce.detach()
            if z is not None:
                z_sum += z.detach()
        max_norm = o.grad_clip if o.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        step_loss = (loss_sum / accum).item()
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm.item())):
            raise TrainingDiverged(
                f"step {step + 1}: loss={step_loss} grad_norm={grad_norm.item()} is not finite; the run diverged."
                " Lower optim.lr, raise optim.warmup_steps or try model.block=sdd."
                f" The last good checkpoint (if any) is in {checkpoint.checkpoint_dir(run_dir)}"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        if done % t.log_interval == 0 or done == t.max_steps or done == start_step + 1:
            now = time.perf_counter()
            steps = done - last_log_step
            record = {"step": done, "loss": step_loss, "lr": lr, "grad_norm": grad_norm.item(),
                      "tokens_per_sec": steps * tokens_per_step / (now - last_log_time),
                      "step_time": (now - last_log_time) / steps}
            if o.z_loss > 0:
                record["z_loss"] = (z_sum / accum).item()
            metrics.write(record)
            log(format_line(record, t.max_steps))
            last_log_time, last_log_step = time.perf_counter(), done
        if eval_data and t.eval_interval and (done % t.eval_interval == 0 or done == t.max_steps):
            val_loss = evaluate(model, eval_data, device, t.precision)
            record = {"step": done, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
            metrics.write(record)
            log(format_line(record, t.max_steps))
            last_log_time = time.perf_counter()  # keep eval time out of tokens/s
        if (t.checkpoint_interval and done % t.checkpoint_interval == 0) or done == t.max_steps:
            path = checkpoint.save(run_dir, done, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                   "step": done}, keep=t.keep_checkpoints)
            if done == t.max_steps:
                log(f"checkpoint: {path}")
            last_log_time = time.perf_counter()
    return run_dir
