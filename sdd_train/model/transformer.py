"""The decoder-only transformer: embedding, a stack of blocks of one scheme, optional final norm, LM head.

The model is plain PyTorch: parallelism (FSDP2), activation checkpointing and ``torch.compile``
are applied to it from outside, block by block, as :meth:`Transformer.parallel_plan` describes
(``sdd_train.distributed`` does not import the model). ``init_weights`` re-initialises every
parameter and buffer in place, so the model can be built on the meta device, materialised with
``to_empty`` and initialised afterwards.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sdd_train.config import ConfigError, ModelConfig
from sdd_train.config.validation import check_choices
from sdd_train.kernels import AttentionMask, attention_mask, autocast_dtype, linear_cross_entropy, lm_loss
from sdd_train.model.blocks import BLOCKS, Block, deepnorm_beta
from sdd_train.model.feed_forward import FEED_FORWARDS
from sdd_train.model.layers import (AttentionInputs, KVCache, RMSNorm, attention_flops_per_token, init_full_, rope_cache,
                                   trunc_normal_, xavier_normal_)
from sdd_train.model.moe import MoE, MoEAux, step_balance_loss
from sdd_train.model.mup import init_stds, logit_scale, width_mult
from sdd_train.model.ngpt import Scale, normalize_


def check_model_config(cfg: ModelConfig) -> None:
    """The names only the model's registries know (the rest of ``model.*`` is checked with the config),
    and the config's own named choices (a ModelConfig built in code has not been validated)."""
    check_choices(cfg, "model.")
    if cfg.block not in BLOCKS:
        raise ConfigError(f"model.block: '{cfg.block}' is not one of {', '.join(sorted(BLOCKS))}")
    if cfg.ffn not in FEED_FORWARDS:
        raise ConfigError(f"model.ffn: '{cfg.ffn}' is not one of {', '.join(sorted(FEED_FORWARDS))}")
    problem = BLOCKS[cfg.block].config_problem(cfg)
    if problem:
        raise ConfigError(problem)


@dataclass
class LossOutput:
    """A forward with targets. ``loss`` is what backward runs on: the token-mean cross-entropy plus
    the weighted logits z-loss and, for an MoE, the weighted load-balancing and router z-losses
    (``model.moe.*_weight``, each averaged over layers); the rest are its parts for logging."""

    loss: torch.Tensor
    ce: torch.Tensor
    z_loss: torch.Tensor | None = None  # mean logsumexp(logits)^2, when optim.z_loss > 0
    moe_lb_loss: torch.Tensor | None = None
    moe_router_z_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None  # [layers, experts] (token, expert) pairs routed to each expert
    router_logit_rms: torch.Tensor | None = None  # [layers] RMS of each router's logits
    # [layers, experts] under lb_loss_scope=global_batch: the pairs every rank routed in this micro-batch, which
    # the next micro-batch of the step hands back summed as ``earlier_counts``
    balance_counts: torch.Tensor | None = None


@dataclass(frozen=True)
class ParallelPlan:
    """What ``sdd_train.distributed.parallelize`` applies activation checkpointing, compile and FSDP2 to."""

    blocks: tuple[nn.Module, ...]  # each checkpointed (those parallel.* chooses), compiled and sharded on its own
    root: nn.Module  # the model, sharded last: the embedding, final norm and head
    compiled_methods: dict[str, Callable[..., Any]]  # the root's methods replaced under compile
    output_types: tuple[type, ...]  # the dataclasses forwards return: FSDP2 finds their tensors with pytree
    expert_layers: tuple[nn.Module, ...] = ()  # the MoE layers, whose experts expert parallelism splits


@dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int  # the token-embedding table
    inactive_experts: int = 0  # expert parameters a token does not use (MoE: (E - k) / E of them)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active(self) -> int:
        """Parameters used per token, without the embedding lookup (the LM head counts)."""
        return self.non_embedding - self.inactive_experts


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_model_config(cfg)
        self.cfg = cfg
        block_cls: type[Block] = BLOCKS[cfg.block]
        self.block_cls = block_cls
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(block_cls(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if block_cls.final_norm else None
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.logit_scale = logit_scale(cfg)  # 1 but under µP (sdd_train/model/mup.py)
        # nGPT's learned logit scale s_z (init 1, scaling 1/sqrt(d)), one per vocabulary entry
        self.logit_gain = Scale(cfg.vocab_size, 1.0, cfg.d_model**-0.5) if block_cls.normalized else None
        self.register_buffer("rope", rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta), persistent=False)
        self.init_weights()

    @property
    def init_scheme(self) -> str:
        scheme = self.cfg.init.scheme
        return self.block_cls.init_scheme if scheme == "auto" else scheme

    def forward(self, tokens: torch.Tensor, doc_ids: AttentionMask = None, cache: KVCache | None = None,
                targets: torch.Tensor | None = None, z_loss: float = 0.0, loss_chunk: int = 4096,
                earlier_counts: torch.Tensor | None = None):
        """tokens [B, S] -> logits [B, S, vocab_size], or with ``targets`` [B, S] a :class:`LossOutput`.

        ``doc_ids`` [B, S] confines attention to documents (or the document mask built from them already,
        spans or a block mask: the data feed's, from the host's ids). With a ``cache`` (:meth:`new_cache`)
        the tokens continue the cached positions and their keys / values are added to it. The loss
        is computed ``loss_chunk`` tokens at a time so the full logits never exist (inside the root
        forward, so FSDP2 has the head weight gathered); ``loss_chunk`` 0: from the full logits.
        ``earlier_counts`` [layers, experts] (``model.moe.lb_loss_scope=global_batch``): the (token, expert)
        pairs every rank routed in the step's earlier micro-batches, which the load-balancing loss counts too.
        """
        states, aux = self.run_blocks(tokens, doc_ids, cache)
        x = states[-1]
        if targets is None:
            return self.head(x)
        if loss_chunk <= 0:
            total, ce, z = lm_loss(self.head(x), targets, z_loss)
        else:
            if self.final_norm is not None:
                x = self.final_norm(x)
            if self.logit_scale != 1.0:
                x = x * self.logit_scale
            total, ce, z = self.chunked_loss(x, self.head_weight, targets, z_loss, loss_chunk)
        out = LossOutput(total, ce, z)
        if aux:
            moe = self.cfg.moe
            lb = [a.lb_loss for a in aux]
            if moe.lb_loss_scope == "global_batch":
                out.balance_counts = torch.stack([a.balance_counts[0] for a in aux])
                if earlier_counts is not None:
                    lb = [step_balance_loss(a, earlier) for a, earlier in zip(aux, earlier_counts)]
            out.moe_lb_loss = torch.stack(lb).mean()
            out.moe_router_z_loss = torch.stack([a.router_z_loss for a in aux]).mean()
            out.loss = total + moe.lb_loss_weight * out.moe_lb_loss + moe.router_z_loss_weight() * out.moe_router_z_loss
            out.expert_load = torch.stack([a.load for a in aux])
            out.router_logit_rms = torch.stack([a.logit_rms for a in aux])
        return out

    def chunked_loss(self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss: float,
                     chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The fused head + loss (under compile the plan below puts in the one with its softmax gradient compiled)."""
        return linear_cross_entropy(x, weight, targets, z_loss, chunk)

    def parallel_plan(self) -> ParallelPlan:
        """The blocks, the model as the root, and under compile the fused loss with its softmax gradient compiled."""
        return ParallelPlan(blocks=tuple(self.blocks), root=self,
                            compiled_methods={"chunked_loss": functools.partial(linear_cross_entropy, compiled=True)},
                            output_types=(LossOutput,),
                            expert_layers=tuple(b.feed_forward for b in self.blocks if isinstance(b.feed_forward, MoE)))

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's matrix; nGPT's logit scale s_z is folded into its rows (s_z[v] (E_v . h))."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        if self.logit_gain is not None:
            weight = weight * self.logit_gain().to(weight.dtype)[:, None]
        return weight

    def hidden_states(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> list[torch.Tensor]:
        """The residual stream after the embedding and after every block."""
        return self.run_blocks(tokens, doc_ids, cache)[0]

    def run_blocks(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None, cache: KVCache | None = None
                   ) -> tuple[list[torch.Tensor], list[MoEAux]]:
        """The residual stream after the embedding and after every block, and what every MoE layer routed."""
        rope = self.rope if cache is None else self.rope[:, cache.pos:cache.pos + tokens.shape[1]]
        mask = attention_mask(doc_ids, self.cfg.attention_backend, autocast_dtype(self.embed.weight))
        att = AttentionInputs(rope, mask, cache)
        x = self.embed(tokens)
        states, aux = [x], []
        for block in self.blocks:
            x, layer_aux = block(x, att)
            states.append(x)
            if layer_aux is not None:
                aux.append(layer_aux)
        if cache is not None:
            cache.pos += tokens.shape[1]
        return states, aux

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` positions (<= max_seq_len)."""
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds model.max_seq_len={self.cfg.max_seq_len} (the RoPE table)")
        return KVCache(self.cfg.n_layers, batch, max_len, self.embed.weight.device)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.logit_scale != 1.0:
            x = x * self.logit_scale
        return nn.functional.linear(x, self.head_weight)

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise per SPEC section 4 (megatron / sdd / deepnorm); gains first set to 1."""
        cfg, init = self.cfg, self.cfg.init
        d, n_layers = cfg.d_model, cfg.n_layers
        self.rope.copy_(rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, device=self.rope.device))
        sigma, embed_sigma = init_stds(cfg)  # equal under SP; µP keeps the embedding's at the base width's
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(getattr(module, "alpha", None), torch.Tensor):  # SDD gains, dense or per expert
                module.alpha.fill_(1.0)
            if isinstance(getattr(module, "expert_bias", None), torch.Tensor):  # MoE selection bias
                module.expert_bias.zero_()
            if isinstance(getattr(module, "residual_gate", None), torch.Tensor):  # ReZero: blocks start as identity
                module.residual_gate.zero_()
            if isinstance(module, Scale):  # nGPT's scaling vectors
                module.reset_parameters()
        scheme = self.init_scheme
        # The reference sets one init_std for the whole model: under sdd it is sdd_std, embedding and router too.
        base_std = sigma * init.sdd_std_multiplier if scheme == "sdd" else sigma
        embed_mult = init.embedding_std_multiplier
        if embed_mult is None:
            embed_mult = init.sdd_std_multiplier if scheme == "sdd" else 1.0
        embed_std = embed_sigma * embed_mult
        # every random fill goes through init_full_, so sharded (FSDP2) parameters get the same values
        init_full_(self.embed.weight, lambda w: trunc_normal_(w, embed_std))
        if self.lm_head is not None:  # std 1/sqrt(fan-in) of the base width: under µP its 1/m multiplier follows (mup.py)
            head_std = (d / width_mult(cfg)) ** -0.5
            init_full_(self.lm_head.weight, lambda w: trunc_normal_(w, head_std))

        for block in self.blocks:
            att_proj, attn_out = block.attention.att_proj, block.attention.attn_out
            ff_proj, ff_out = block.feed_forward.ff_proj, block.feed_forward.ff_out
            if scheme == "megatron":
                out_std = sigma / math.sqrt(2 * n_layers) if init.depth_scaled_output else sigma
                init_full_(att_proj.weight, lambda w: trunc_normal_(w, sigma))
                init_full_(ff_proj.weight, lambda w: trunc_normal_(w, sigma))
                init_full_(attn_out.weight, lambda w: trunc_normal_(w, out_std))
                init_full_(ff_out.weight, lambda w: trunc_normal_(w, out_std))
            elif scheme == "sdd":
                for lin in (att_proj, attn_out, ff_proj, ff_out):
                    init_full_(lin.weight, lambda w: trunc_normal_(w, base_std))
                for lin in (attn_out, ff_out):  # output SDD gains carry the depth scaling (per expert in MoE)
                    if getattr(lin, "alpha", None) is not None:
                        lin.alpha.fill_(1.0 / math.sqrt(2 * n_layers))
            elif scheme == "deepnorm":
                beta = deepnorm_beta(n_layers)
                split = [d, block.attention.kv_dim, block.attention.kv_dim]

                def qkv(w: torch.Tensor) -> None:
                    for part, gain in zip(w.split(split, dim=0), (1.0, 1.0, beta)):
                        xavier_normal_(part, gain)

                def up_gate(w: torch.Tensor) -> None:  # up and gate are separate matrices in DeepNet
                    for half in w.chunk(2, dim=-2):
                        xavier_normal_(half, beta)

                init_full_(att_proj.weight, qkv)
                init_full_(attn_out.weight, lambda w: xavier_normal_(w, beta))
                init_full_(ff_proj.weight, up_gate)
                init_full_(ff_out.weight, lambda w: xavier_normal_(w, beta))
            else:  # validated in config; guards direct construction
                raise ValueError(f"model.init.scheme: unknown scheme {scheme!r}")
            router = getattr(block.feed_forward, "router", None)
            if router is not None:
                init_full_(router.weight, lambda w: trunc_normal_(w, base_std))
        self.project_weights_()

    @torch.no_grad()
    def project_weights_(self) -> None:
        """Restore the constraints the block scheme keeps on the weights (nGPT: unit-norm embedding and
        head rows and matrices), after initialisation and after every optimizer step; other schemes keep none."""
        if not self.block_cls.normalized:
            return
        normalize_(self.embed.weight, dim=-1)
        normalize_(self.lm_head.weight, dim=-1)
        for block in self.blocks:
            block.project_weights_()

    # ------------------------------------------------------------------ accounting

    def param_counts(self) -> ParamCounts:
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        if self.cfg.ffn == "moe":
            m = self.cfg.moe
            experts = sum(p.numel() for b in self.blocks for n, p in b.feed_forward.named_parameters()
                          if n.startswith(("ff_proj", "ff_out")))
            inactive = experts * (m.n_experts - m.top_k) // m.n_experts
        return ParamCounts(total=total, embedding=self.embed.weight.numel(), inactive_experts=inactive)

    def describe(self, seq_len: int) -> str:
        """Shape, scheme, parameter counts and training FLOPs per token, as printed at start-up."""
        m, counts = self.cfg, self.param_counts()
        ffn = (f"moe {m.moe.n_experts} experts top-{m.moe.top_k} x {m.moe.expert_hidden}" if m.ffn == "moe"
               else f"ffn={m.ffn_hidden}")
        active = f", {counts.active:,} active (MoE, without the embedding lookup)" if m.ffn == "moe" else ""
        return (f"model: block={m.block} init={self.init_scheme} d={m.d_model} L={m.n_layers}"
                f" heads={m.n_heads}/{m.n_kv_heads} {ffn} vocab={m.vocab_size}\n"
                f"params: {counts.total:,} total, {counts.non_embedding:,} non-embedding{active};"
                f" {self.flops_per_token(seq_len) / 1e9:.3f} GFLOPs/token (train, seq {seq_len})")

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x (active non-embedding params + the LM-head matmul) + attention.

        The head matmul is counted even when its weight is tied to the embedding: it is real work.
        MoE counts only the top-k experts a token uses (active FLOPs).
        """
        counts = self.param_counts()
        head = self.cfg.vocab_size * self.cfg.d_model if self.lm_head is None else 0
        return 6.0 * (counts.active + head) + attention_flops_per_token(self.cfg, seq_len)
