"""Typed run configuration: dataclass schema, YAML composition, overrides, validation.

A run config is YAML validated against :class:`RunConfig`. A file may list other files under
``defaults:`` (paths relative to that file, without ``.yaml``); they are merged first, in order,
and the file's own keys win. On the command line ``dotted.key=value`` overrides a key, and
``group=name`` swaps the ``group/...`` entry of the top-level defaults list (``block=sdd``).

Every problem is reported as a :class:`ConfigError` whose message starts with the offending key,
before any work starts; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration or usage error; the message names the key and what is allowed."""


# --------------------------------------------------------------------------- schema


@dataclass
class InitConfig:
    # 'auto' takes the block scheme's own scheme (megatron for pre/post/reordered/spannorm,
    # sdd for sdd/sdd_pre, deepnorm for deepnorm).
    scheme: str = "auto"
    # Base std sigma; null means 1/sqrt(2.5 * d_model) (OLMo2).
    std: float | None = None
    # Multiplies every std (the paper's "init std x 0.1" ablation is std_multiplier=0.1).
    std_multiplier: float = 1.0
    # Under the sdd scheme every weight, the embedding and the MoE router included, uses
    # sdd_std_multiplier * sigma (0.1 in the reference run script; the paper's text says 1).
    sdd_std_multiplier: float = 0.1
    # Megatron init: output projections get sigma/sqrt(2L) (SpanNorm's "ScaleInit"); false keeps sigma.
    depth_scaled_output: bool = True


@dataclass
class SpanNormConfig:
    # Multiplier on the residual x that spans the block: x' = N(beta*x + A(.) + F(.)).
    residual_scale: float = 1.0


@dataclass
class MoEConfig:
    """Used when model.ffn=moe: dropless token-choice routing over n_experts SwiGLU experts."""

    n_experts: int = 64
    top_k: int = 8
    expert_hidden: int = 512  # per SwiGLU branch of each expert
    renormalize: bool = False  # combine weights: raw top-k probabilities (SPEC) or renormalised to sum 1
    lb_loss_weight: float = 0.01  # load balancing, averaged over layers
    z_loss_weight: float = 0.001  # router z-loss, averaged over layers
    grouped_mm: str = "auto"  # auto: torch._grouped_mm where it runs, else a per-expert loop | loop
    # Multiplies the SDD experts' output gain in the forward (the parameter keeps its 1/sqrt(2L) init).
    # 1 is the formula; the reference code's sparse ops compute expert_hidden / n_experts here (docs/paper.md).
    sdd_out_gain_scale: float = 1.0


@dataclass
class ModelConfig:
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 688  # per SwiGLU branch
    vocab_size: int = 8192  # embedding rows (padded); must cover the tokenizer
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    block: str = "pre"
    # none | head (per-head, gain shared across heads) | full (over all q / k features, OLMo2) | auto
    qk_norm: str = "auto"
    # SDD up+gate projection: one norm over the fused vector (reference) or one per branch.
    sdd_ffn_norm: str = "fused"
    ffn: str = "dense"  # dense (SwiGLU) | moe (model.moe)
    attention_backend: str = "auto"  # auto | sdpa | flash
    init: InitConfig = field(default_factory=InitConfig)
    spannorm: SpanNormConfig = field(default_factory=SpanNormConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class DatasetConfig:
    path: str = "???"  # a directory written by 'sdd-data prepare'
    weight: float = 1.0  # mixing weight: this dataset's share of every epoch is weight / sum(weights)
    name: str | None = None  # for messages; default: the directory name


@dataclass
class EvalSetConfig:
    name: str = "???"  # logged as val/<name>/loss
    path: str = "???"  # a directory written by 'sdd-data prepare' (same tokenizer as the training data)
    split: str = "val"  # val (its held-out documents) | train (its main split)


@dataclass
class DataConfig:
    # 'stdlib': the embedded default corpus built from this Python's standard library sources.
    # 'prepared': the datasets listed under data.datasets.
    source: str = "stdlib"
    datasets: list[DatasetConfig] = field(default_factory=list)
    # Named validation sets; empty: the held-out split of every training dataset, named after it.
    eval_sets: list[EvalSetConfig] = field(default_factory=list)
    doc_mask: bool = False  # attention stays within documents (EOS-separated) instead of spanning them
    prefetch: bool = True  # read the next step's batches in a background thread
    # stdlib corpus only:
    tokenizer_vocab_size: int = 8192
    max_corpus_bytes: int = 12_000_000
    val_fraction: float = 0.01
    cache_dir: str | None = None  # null: $SDD_TRAIN_CACHE or ~/.cache/sdd_train


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_gains: bool = True  # weight decay on norm gains and SDD alphas (reference: yes)
    decay_embeddings: bool = False  # weight decay on the token embedding (reference dense: no)
    # Schedule: linear warmup from warmup_start * lr to lr, then a cosine down to alpha_f * lr at the horizon,
    # then constant. Evaluated at the steps (tokens) done including the current one, as OLMo's scheduler.
    warmup_steps: int = 2000
    warmup_tokens: float | None = None  # the warmup in tokens instead (replaces warmup_steps when set)
    warmup_start: float = 0.0  # lr of the warmup's start as a fraction of lr (OLMo's warmup_min_lr / lr)
    horizon_steps: int | None = None  # where the cosine reaches alpha_f * lr; null: train.max_steps
    horizon_tokens: float | None = None  # the horizon in tokens instead (the reference's t_max)
    alpha_f: float = 0.1  # cosine decays to alpha_f * lr
    grad_clip: float = 1.0  # global norm; 0 disables
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2); 0 disables


@dataclass
class TrainConfig:
    max_steps: int = 1000
    seq_len: int = 256
    global_batch_size: int = 32  # sequences per optimizer step
    micro_batch_size: int = 16  # sequences per forward/backward
    precision: str = "bf16"  # bf16 (autocast, fp32 master weights) | fp32
    device: str = "auto"  # auto | cpu | cuda
    compile: bool | None = None  # torch.compile each block (fullgraph); null: on with CUDA, off on CPU
    # > 0: LM head + cross-entropy fused, this many tokens at a time: the full logits never exist,
    # and the softmax gradient is formed in the forward pass (faster than autograd's on CPU too);
    # 0: the model returns logits, then the plain loss
    loss_chunk_size: int = 4096
    seed: int = 0
    log_interval: int = 10
    eval_interval: int = 100  # 0 disables in-loop validation
    eval_batches: int = 4
    checkpoint_interval: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2  # the newest N interval checkpoints are kept
    permanent_checkpoint_interval: int = 0  # also keep every M-th step forever; 0 disables
    async_checkpoint: bool = False  # write checkpoints in the background (torch.distributed.checkpoint.async_save)
    nonfinite: str = "stop"  # NaN/Inf loss or gradient: stop (exit 3) | skip (drop the update, count it)
    max_nonfinite_skips: int = 10  # with nonfinite=skip: stop after this many consecutive skipped steps
    peak_tflops: float | None = None  # per device, for MFU; null: known GPUs (H100/H200 989.5), else no MFU
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise-reproducible GPU runs, slower)


@dataclass
class ParallelConfig:
    """Data parallelism over all ranks: FSDP2 (dp_replicate=1) or HSDP (replicate x shard)."""

    dp_replicate: int = 1  # replica groups; > 1 is HSDP
    dp_shard: int = -1  # ranks per shard group; -1: world_size / dp_replicate
    reshard_after_forward: bool = True  # free gathered parameters after forward (ZeRO-3); false: ZeRO-2-like
    activation_checkpointing: str = "none"  # none | full | every_n
    ac_every: int = 2  # with every_n: checkpoint blocks 0, n, 2n, ...
    defer_grad_sync: bool = True  # reduce-scatter gradients once per step, not per micro-batch


@dataclass
class LoggingConfig:
    wandb: str = "disabled"  # disabled | online | offline (offline needs no network; sync later)
    wandb_project: str = "sdd_train"
    wandb_entity: str | None = None
    wandb_group: str | None = None
    progress_bar: bool = True  # a tqdm bar on rank 0 when stdout is a terminal


@dataclass
class SpikeConfig:
    """Loss-spike detection against rolling statistics of the recent finite steps."""

    action: str = "log"  # none | log (record the event) | skip (drop the update) | rollback (reload, skip the data)
    window: int = 100  # steps in the rolling mean / std
    min_history: int = 20  # no verdicts before this many steps are in the window
    loss_sigmas: float = 6.0  # spike: loss > mean + loss_sigmas * std; 0 disables
    grad_norm_sigmas: float = 6.0  # spike: grad norm > mean + grad_norm_sigmas * std; 0 disables
    min_increase: float = 0.1  # ... and at least this fraction above the rolling mean (ignores noise on plateaus)
    skip_batches: int = 1  # rollback: global batches skipped from the offending one on
    max_rollbacks: int = 5  # rollback: after this many the action falls back to skip


@dataclass
class DiagnosticsConfig:
    """Stability diagnostics written next to metrics.jsonl (see docs/diagnostics.md)."""

    # Per-layer gradient / parameter / update norms of every parameter family, every N steps; 0 disables.
    layer_stats_interval: int = 100
    # Residual-stream RMS and the layer-by-layer cosine similarity on a fixed held-out batch; 0 disables.
    activation_interval: int = 1000
    spike: SpikeConfig = field(default_factory=SpikeConfig)


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str | None = None  # null: runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry line numbers; keep them on one line
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return cfg


def _defaults_of(cfg: DictConfig, path: Path) -> list[str]:
    if "defaults" not in cfg:
        return []
    defaults = cfg.defaults
    if not OmegaConf.is_list(defaults) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"defaults: in {path} must be a list of file names like 'model/tiny'")
    return list(defaults)


def _compose(path: Path, swaps: dict[str, str], depth: int = 0) -> DictConfig:
    """Merge a file's defaults (recursively) under its own keys."""
    if depth > 16:
        raise ConfigError(f"defaults: nesting deeper than 16 at {path} (a cycle?)")
    cfg = _read_yaml(path)
    merged = OmegaConf.create({})
    for entry in _defaults_of(cfg, path):
        group = entry.split("/", 1)[0] if "/" in entry else None
        if depth == 0 and group in swaps:
            entry = f"{group}/{swaps[group]}"
        target = path.parent / f"{entry}.yaml"
        if not target.is_file():
            options = _group_options(path.parent, group)
            hint = f" (available: {', '.join(options)})" if options else ""
            raise ConfigError(f"defaults: '{entry}' not found as {target}{hint}")
        merged = OmegaConf.merge(merged, _compose(target, swaps, depth + 1))
    if "defaults" in cfg:
        cfg.pop("defaults")
    return OmegaConf.merge(merged, cfg)


def _group_options(root: Path, group: str | None) -> list[str]:
    if group is None or not (root / group).is_dir():
        return []
    return sorted(p.stem for p in (root / group).glob("*.yaml"))


def _one_line(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{key}: {first}" if key else first


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Compose, override, type-check and validate a run config. Raises ConfigError."""
    path = Path(path)
    dotted = [o for o in overrides if "=" in o and "." in o.split("=", 1)[0]]
    swaps: dict[str, str] = {}
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override '{o}': expected dotted.key=value (or group=name for a defaults group)")
        if o not in dotted:
            key, value = o.split("=", 1)
            top = {f.name for f in RunConfig.__dataclass_fields__.values()}
            if key in top:  # a top-level scalar such as name=foo
                dotted.append(o)
            else:
                swaps[key] = value
    raw = _compose(path, swaps)
    base_defaults = _defaults_of(_read_yaml(path), path)
    for group in swaps:
        if not any(d.startswith(group + "/") for d in base_defaults):
            raise ConfigError(
                f"override '{group}={swaps[group]}': '{group}' is neither a config key nor a defaults group of {path}"
            )
    schema = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(schema, raw)
        if dotted:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(dotted))
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    validate(cfg)
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)


# --------------------------------------------------------------------------- validation


def _choice(key: str, value: str, allowed: list[str] | tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that the type system cannot express."""
    from sdd_train.model.blocks import BLOCKS
    from sdd_train.model.feed_forward import FEED_FORWARDS

    m, t, o, d, par = cfg.model, cfg.train, cfg.optim, cfg.data, cfg.parallel
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
    _choice("model.block", m.block, sorted(BLOCKS))
    _choice("model.qk_norm", m.qk_norm, ["auto", "none", "head", "full"])
    _choice("model.sdd_ffn_norm", m.sdd_ffn_norm, ["fused", "per_branch"])
    _choice("model.ffn", m.ffn, sorted(FEED_FORWARDS))
    _choice("model.attention_backend", m.attention_backend, ["auto", "sdpa", "flash"])
    _choice("model.init.scheme", m.init.scheme, ["auto", "megatron", "sdd", "deepnorm"])
    if m.init.std is not None:
        _positive("model.init.std", m.init.std)
    _positive("model.init.std_multiplier", m.init.std_multiplier)
    _positive("model.init.sdd_std_multiplier", m.init.sdd_std_multiplier)
    _positive("model.spannorm.residual_scale", m.spannorm.residual_scale)
    _positive("model.moe.sdd_out_gain_scale", m.moe.sdd_out_gain_scale)
    if m.ffn == "moe":
        for key in ("n_experts", "top_k", "expert_hidden"):
            _positive(f"model.moe.{key}", getattr(m.moe, key))
        if m.moe.top_k > m.moe.n_experts:
            raise ConfigError(f"model.moe.top_k: {m.moe.top_k} is more than model.moe.n_experts={m.moe.n_experts}")
        _positive("model.moe.lb_loss_weight", m.moe.lb_loss_weight, allow_zero=True)
        _positive("model.moe.z_loss_weight", m.moe.z_loss_weight, allow_zero=True)
        _choice("model.moe.grouped_mm", m.moe.grouped_mm, ["auto", "loop"])

    _choice("data.source", d.source, ["stdlib", "prepared"])
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
        _choice(f"data.eval_sets.{i}.split", es.split, ["val", "train"])
    eval_names = [es.name for es in d.eval_sets]
    if len(set(eval_names)) != len(eval_names):
        raise ConfigError(f"data.eval_sets: names must be unique, got {', '.join(eval_names)}")
    if d.tokenizer_vocab_size < 300:
        raise ConfigError(f"data.tokenizer_vocab_size: must be >= 300 (256 byte pieces + specials), got {d.tokenizer_vocab_size}")
    if d.source == "stdlib" and m.vocab_size < d.tokenizer_vocab_size:
        raise ConfigError(
            f"model.vocab_size: {m.vocab_size} is smaller than data.tokenizer_vocab_size={d.tokenizer_vocab_size};"
            " the embedding must cover every token id"
        )
    _positive("data.max_corpus_bytes", d.max_corpus_bytes)
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

    for key in ("max_steps", "seq_len", "global_batch_size", "micro_batch_size", "log_interval", "keep_checkpoints"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("eval_interval", "eval_batches", "checkpoint_interval", "loss_chunk_size"):
        _positive(f"train.{key}", getattr(t, key), allow_zero=True)
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len: {t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of"
            f" train.micro_batch_size={t.micro_batch_size}"
        )
    _choice("train.precision", t.precision, ["bf16", "fp32"])
    _choice("train.device", t.device, ["auto", "cpu", "cuda"])
    _positive("train.permanent_checkpoint_interval", t.permanent_checkpoint_interval, allow_zero=True)
    _choice("train.nonfinite", t.nonfinite, ["stop", "skip"])
    _positive("train.max_nonfinite_skips", t.max_nonfinite_skips)
    if t.peak_tflops is not None:
        _positive("train.peak_tflops", t.peak_tflops)

    _positive("parallel.dp_replicate", par.dp_replicate)
    if par.dp_shard != -1:
        _positive("parallel.dp_shard", par.dp_shard)
    _choice("parallel.activation_checkpointing", par.activation_checkpointing, ["none", "full", "every_n"])
    _positive("parallel.ac_every", par.ac_every)
    _choice("logging.wandb", cfg.logging.wandb, ["disabled", "online", "offline"])
    diag, spike = cfg.diagnostics, cfg.diagnostics.spike
    _positive("diagnostics.layer_stats_interval", diag.layer_stats_interval, allow_zero=True)
    _positive("diagnostics.activation_interval", diag.activation_interval, allow_zero=True)
    _choice("diagnostics.spike.action", spike.action, ["none", "log", "skip", "rollback"])
    for key in ("window", "min_history", "skip_batches"):
        _positive(f"diagnostics.spike.{key}", getattr(spike, key))
    for key in ("loss_sigmas", "grad_norm_sigmas", "min_increase", "max_rollbacks"):
        _positive(f"diagnostics.spike.{key}", getattr(spike, key), allow_zero=True)
    if spike.min_history > spike.window:
        raise ConfigError(f"diagnostics.spike.min_history: {spike.min_history} exceeds diagnostics.spike.window="
                          f"{spike.window}; the window never holds that many steps")
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name: must be a non-empty name without '/', got '{cfg.name}'")


def _validate_schedule(o: OptimConfig, t: TrainConfig) -> None:
    if not 0 <= o.warmup_start < 1:
        raise ConfigError(f"optim.warmup_start: must be in [0, 1) (a fraction of optim.lr), got {o.warmup_start}")
    if o.warmup_tokens is not None:
        _positive("optim.warmup_tokens", o.warmup_tokens, allow_zero=True)
    if o.horizon_steps is not None and o.horizon_tokens is not None:
        raise ConfigError("optim.horizon_tokens: set either optim.horizon_steps or optim.horizon_tokens, not both")
    tokens_per_step = t.global_batch_size * t.seq_len
    warmup = o.warmup_tokens if o.warmup_tokens is not None else o.warmup_steps * tokens_per_step
    for key, horizon in (("horizon_steps", o.horizon_steps), ("horizon_tokens", o.horizon_tokens)):
        if horizon is None:
            continue
        _positive(f"optim.{key}", horizon)
        tokens = horizon * tokens_per_step if key == "horizon_steps" else horizon
        if tokens <= warmup:
            raise ConfigError(f"optim.{key}: the horizon ({horizon:g}) must lie beyond the warmup"
                              f" ({warmup:g} tokens = {warmup / tokens_per_step:g} steps)")


def as_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
