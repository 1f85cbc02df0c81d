"""Cross-field rules of a run config that its types cannot express, each failing with the key's name.

Each rule is written once, here; the checks that need what only a running job knows (the world
size, the tokenizer) call the same functions with it (:func:`check_batch_split`, :func:`check_vocab_covers`).
"""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from typing import Any

from sdd_train.config.schedule import phases
from sdd_train.config.schema import ConfigError, OptimConfig, RunConfig, TrainConfig


def check_choices(section: Any, prefix: str = "") -> None:
    """Every field declared with :func:`sdd_train.config.schema.choice` in ``section`` (a config
    dataclass, its nested sections and lists of them) holds one of its allowed values."""
    for f in fields(section):
        key, value = f"{prefix}{f.name}", getattr(section, f.name)
        allowed = f.metadata.get("choices")
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}")
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if is_dataclass(item):
                check_choices(item, f"{key}." if i is None else f"{key}.{i}.")


def check_batch_split(t: TrainConfig, world_size: int = 1) -> None:
    """Every rank gets whole micro-batches of every global batch (at load time: one rank)."""
    if t.global_batch_size % (world_size * t.micro_batch_size) == 0:
        return
    if world_size == 1:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not a multiple of"
                          f" train.micro_batch_size={t.micro_batch_size}")
    raise ConfigError(
        f"train.global_batch_size: {t.global_batch_size} is not a multiple of world_size ({world_size})"
        f" x train.micro_batch_size ({t.micro_batch_size}); change either so every rank gets whole micro-batches"
    )


def check_vocab_covers(vocab_size: int, pieces: int, tokenizer: str) -> None:
    """The embedding has a row for every token id of the tokenizer (described by ``tokenizer``)."""
    if vocab_size < pieces:
        raise ConfigError(f"model.vocab_size: {vocab_size} is smaller than {tokenizer}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that the type system cannot express. The names of block schemes and
    feed-forwards belong to the model's registries and are checked where the model is built
    (:func:`sdd_train.model.check_model_config`)."""
    m, t, o, d, par = cfg.model, cfg.train, cfg.optim, cfg.data, cfg.parallel
    check_choices(cfg)
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size", "max_seq_len"):
        _positive(f"model.{key}", getattr(m, key))
    _positive("model.rope_theta", m.rope_theta)
    _positive("model.norm_eps", m.norm_eps)
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads: d_model={m.d_model} is not divisible by n_heads={m.n_heads}")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads: n_heads={m.n_heads} is not divisible by n_kv_heads={m.n_kv_heads}")
    if m.head_dim % 2:
        raise ConfigError(f"model.n_heads: head_dim={m.head_dim} must be even for RoPE")
    if m.parametrization == "mup":
        if m.mup_base_width is None:
            raise ConfigError("model.mup_base_width: model.parametrization=mup needs the d_model its init and learning"
                              " rates were tuned at (the base width), e.g. model.mup_base_width=256")
        _positive("model.mup_base_width", m.mup_base_width)
        if m.mup_base_width % m.n_heads:
            raise ConfigError(f"model.mup_base_width: {m.mup_base_width} is not divisible by n_heads={m.n_heads} (the"
                              " base model has the same heads)")
    if m.init.std is not None:
        _positive("model.init.std", m.init.std)
    _positive("model.init.std_multiplier", m.init.std_multiplier)
    _positive("model.init.sdd_std_multiplier", m.init.sdd_std_multiplier)
    _positive("model.spannorm.residual_scale", m.spannorm.residual_scale)
    if m.init.embedding_std_multiplier is not None:
        _positive("model.init.embedding_std_multiplier", m.init.embedding_std_multiplier)
    if not 0.0 <= m.mixln.post_fraction <= 1.0:
        raise ConfigError(f"model.mixln.post_fraction: {m.mixln.post_fraction} is not a fraction; choose one in [0, 1]")
    _positive("model.moe.sdd_out_gain_scale", m.moe.sdd_out_gain_scale)
    _positive("model.moe.bias_update_rate", m.moe.bias_update_rate, allow_zero=True)
    if m.ffn == "moe":
        for key in ("n_experts", "top_k", "expert_hidden"):
            _positive(f"model.moe.{key}", getattr(m.moe, key))
        if m.moe.top_k > m.moe.n_experts:
            raise ConfigError(f"model.moe.top_k: {m.moe.top_k} is more than model.moe.n_experts={m.moe.n_experts}")
        _positive("model.moe.lb_loss_weight", m.moe.lb_loss_weight, allow_zero=True)
        if m.moe.z_loss_weight is not None:
            _positive("model.moe.z_loss_weight", m.moe.z_loss_weight, allow_zero=True)

    if d.source == "prepared" and not d.datasets:
        raise ConfigError("data.datasets: data.source=prepared needs at least one dataset"
                          " ({path: DIR, weight: 1.0}, prepared with 'sdd-data prepare')")
    for i, ds in enumerate(d.datasets):
        if not ds.path:
            raise ConfigError(f"data.datasets.{i}.path: missing; the directory of a prepared dataset")
        _positive(f"data.datasets.{i}.weight", ds.weight)
    for i, es in enumerate(d.eval_sets):
        if not es.name or "/" in es.name or not es.path:
            raise ConfigError(f"data.eval_sets.{i}: needs a name (without '/') and the path of a prepared dataset")
    eval_names = [es.name for es in d.eval_sets]
    if len(set(eval_names)) != len(eval_names):
        raise ConfigError(f"data.eval_sets: names must be unique, got {', '.join(eval_names)}")
    if d.tokenizer_vocab_size < 300:
        raise ConfigError(f"data.tokenizer_vocab_size: must be >= 300 (256 byte pieces + specials), got {d.tokenizer_vocab_size}")
    if d.source == "stdlib":
        check_vocab_covers(m.vocab_size, d.tokenizer_vocab_size,
                           f"data.tokenizer_vocab_size={d.tokenizer_vocab_size}; the embedding must cover every token id")
    _positive("data.max_corpus_bytes", d.max_corpus_bytes)
    f = d.instance_filter
    _positive("data.instance_filter.repetition_min_period", f.repetition_min_period)
    if f.repetition_max_period < f.repetition_min_period:
        raise ConfigError(f"data.instance_filter.repetition_max_period: {f.repetition_max_period} is below"
                          f" repetition_min_period={f.repetition_min_period}")
    if f.repetition_max_count < 2:
        raise ConfigError(f"data.instance_filter.repetition_max_count: must be >= 2 (a repetition), got"
                          f" {f.repetition_max_count}")
    if not 0 < d.val_fraction < 0.5:
        raise ConfigError(f"data.val_fraction: must be in (0, 0.5), got {d.val_fraction}")

    _positive("optim.lr", o.lr)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas: must be two numbers in [0, 1), got {list(o.betas)}")
    _positive("optim.eps", o.eps)
    for key in ("weight_decay", "grad_clip", "z_loss", "warmup_steps"):
        _positive(f"optim.{key}", getattr(o, key), allow_zero=True)
    if not 0 <= o.alpha_f <= 1:
        raise ConfigError(f"optim.alpha_f: must be in [0, 1], got {o.alpha_f}")
    _validate_schedule(o, t)
    if not 0 <= o.muon.momentum < 1:
        raise ConfigError(f"optim.muon.momentum: must be in [0, 1), got {o.muon.momentum}")
    _positive("optim.muon.ns_steps", o.muon.ns_steps)
    _positive("optim.muon.lr_multiplier", o.muon.lr_multiplier)

    for key in ("max_steps", "seq_len", "global_batch_size", "micro_batch_size", "log_interval", "keep_checkpoints",
                "signal_check_interval"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("eval_interval", "eval_batches", "checkpoint_interval", "loss_chunk_size"):
        _positive(f"train.{key}", getattr(t, key), allow_zero=True)
    for key in ("limit", "batch_size", "interval"):
        _positive(f"downstream.{key}", getattr(cfg.downstream, key), allow_zero=True)
    if len(set(cfg.downstream.tasks)) != len(cfg.downstream.tasks):
        raise ConfigError(f"downstream.tasks: each task once, got {', '.join(cfg.downstream.tasks)}")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len: {t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    check_batch_split(t)
    _positive("train.permanent_checkpoint_interval", t.permanent_checkpoint_interval, allow_zero=True)
    _positive("train.max_nonfinite_skips", t.max_nonfinite_skips)
    for key in ("steps", "wait", "warmup"):
        _positive(f"train.profile.{key}", getattr(t.profile, key), allow_zero=True)
    if t.peak_tflops is not None:
        _positive("train.peak_tflops", t.peak_tflops)

    _positive("parallel.dp_replicate", par.dp_replicate)
    if par.dp_shard != -1:
        _positive("parallel.dp_shard", par.dp_shard)
    _positive("parallel.ac_every", par.ac_every)
    _positive("parallel.ep", par.ep)
    if par.ep > 1 and m.ffn != "moe":
        raise ConfigError(f"parallel.ep: expert parallelism needs an MoE (model.ffn=moe, got {m.ffn}); set parallel.ep=1")
    if par.ep > 1 and m.moe.n_experts % par.ep:
        raise ConfigError(f"parallel.ep: {m.moe.n_experts} experts do not split over {par.ep} ranks; choose an ep that"
                          " divides model.moe.n_experts")
    if par.param_dtype == "bf16" and t.precision != "bf16":
        raise ConfigError(f"parallel.param_dtype: bf16 parameters need train.precision=bf16 (got {t.precision});"
                          " set train.precision=bf16 or parallel.param_dtype=fp32")
    diag, spike = cfg.diagnostics, cfg.diagnostics.spike
    _positive("diagnostics.layer_stats_interval", diag.layer_stats_interval, allow_zero=True)
    _positive("diagnostics.activation_interval", diag.activation_interval, allow_zero=True)
    for key in ("window", "min_history", "skip_batches"):
        _positive(f"diagnostics.spike.{key}", getattr(spike, key))
    for key in ("loss_sigmas", "grad_norm_sigmas", "min_increase", "max_rollbacks"):
        _positive(f"diagnostics.spike.{key}", getattr(spike, key), allow_zero=True)
    if spike.min_history > spike.window:
        raise ConfigError(f"diagnostics.spike.min_history: {spike.min_history} exceeds diagnostics.spike.window="
                          f"{spike.window}; the window never holds that many steps")
    for i, cb in enumerate(cfg.callbacks):
        if not cb.path or ":" not in cb.path and "." not in cb.path or cb.path.startswith("."):
            raise ConfigError(f"callbacks.{i}.path: '{cb.path}' is not an absolute import path like"
                              " 'package.module:Class'")
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError(f"name: must be a non-empty name without '/' (nor '.' or '..'), got '{cfg.name}'")
    if not 0 <= t.seed < 2**63:
        raise ConfigError(f"train.seed: must be in [0, 2^63), got {t.seed}")


def _validate_schedule(o: OptimConfig, t: TrainConfig) -> None:
    if not 0 <= o.warmup_start < 1:
        raise ConfigError(f"optim.warmup_start: must be in [0, 1) (a fraction of optim.lr), got {o.warmup_start}")
    if o.warmup_tokens is not None:
        _positive("optim.warmup_tokens", o.warmup_tokens, allow_zero=True)
    if o.horizon_steps is not None and o.horizon_tokens is not None:
        raise ConfigError("optim.horizon_tokens: set either optim.horizon_steps or optim.horizon_tokens, not both")
    tokens_per_step = t.global_batch_size * t.seq_len
    warmup = phases(o, t.max_steps, tokens_per_step).warmup
    for key, horizon in (("horizon_steps", o.horizon_steps), ("horizon_tokens", o.horizon_tokens)):
        if horizon is None:
            continue
        _positive(f"optim.{key}", horizon)
        tokens = horizon * tokens_per_step if key == "horizon_steps" else horizon
        if tokens <= warmup:
            raise ConfigError(f"optim.{key}: the horizon ({horizon:g}) must lie beyond the warmup"
                              f" ({warmup:g} tokens = {warmup / tokens_per_step:g} steps)")
    if o.schedule != "wsd":
        return
    if not 0 < o.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction: must be in (0, 1] (a share of the horizon), got {o.decay_fraction}")
    if o.decay_steps is not None:
        _positive("optim.decay_steps", o.decay_steps)
    ph = phases(o, t.max_steps, tokens_per_step)
    if ph.decay_start < ph.warmup:
        key = "optim.decay_steps" if o.decay_steps is not None else "optim.decay_fraction"
        decay = ph.horizon - ph.decay_start
        raise ConfigError(f"{key}: the wsd decay ({decay / tokens_per_step:g} steps) would start before the"
                          f" warmup ends ({ph.warmup / tokens_per_step:g} of the horizon's"
                          f" {ph.horizon / tokens_per_step:g} steps); shorten the decay or the warmup")
