"""Transformer block schemes, selected by ``model.block``.

``A`` is the attention sublayer (with its output projection), ``F`` the feed-forward, ``N`` an
RMSNorm with a learned gain. A new scheme is one subclass of :class:`Block` plus ``@register``.
Class attributes carry what the rest of the model needs to know about a scheme:

- ``qk_norm``: default QK-norm ('none', 'head', 'full') when ``model.qk_norm=auto``;
- ``v_norm``: an RMSNorm on the attention's values (over all KV features);
- ``sdd``: whether A and F use SDD layers (A_sdd / F_sdd, SPEC section 2);
- ``final_norm``: whether the stream needs an RMSNorm before the LM head;
- ``init_scheme``: default initialisation when ``model.init.scheme=auto``;
- ``normalized``: nGPT's hypersphere (unit-norm embedding rows and matrices, kept so after every
  optimizer step by :meth:`Block.project_weights_`; a learned logit scale instead of a final norm).

A scheme that cannot serve a configuration says so in :meth:`Block.config_problem` (checked at start-up).

A block maps the residual stream ``x`` and the forward's :class:`AttentionInputs` (RoPE table,
document mask, KV cache) to the new stream and what its feed-forward reports (:class:`MoEAux` for
an MoE, None for a dense FFN): everything a forward computes is returned.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sdd_train.config import ModelConfig
from sdd_train.kernels import l2_normalize
from sdd_train.model.feed_forward import build_feed_forward
from sdd_train.model.layers import Attention, AttentionInputs, RMSNorm
from sdd_train.model.moe import MoEAux
from sdd_train.model.ngpt import NormalizedAttention, NormalizedFeedForward, Scale

BlockOutput = tuple[torch.Tensor, MoEAux | None]

BLOCKS: dict[str, type[Block]] = {}


def register(name: str):
    def wrap(cls: type[Block]) -> type[Block]:
        cls.name = name
        BLOCKS[name] = cls
        return cls

    return wrap


class Block(nn.Module):
    name = "base"
    qk_norm = "none"
    v_norm = False
    sdd = False
    final_norm = False
    init_scheme = "megatron"
    normalized = False

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        qk_norm = self.qk_norm if cfg.qk_norm == "auto" else cfg.qk_norm
        self.attention = Attention(cfg, qk_norm=qk_norm, sdd=self.sdd, layer_id=layer_id, v_norm=self.v_norm)
        self.feed_forward = build_feed_forward(cfg, sdd=self.sdd)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x: torch.Tensor, att: AttentionInputs) -> BlockOutput:
        raise NotImplementedError

    @classmethod
    def config_problem(cls, cfg: ModelConfig) -> str | None:
        """What in ``cfg`` this scheme cannot build ('key: why; the fix'), or None."""
        return None

    def project_weights_(self) -> None:
        """Restore the constraints the scheme keeps on its weights after an optimizer step (none here)."""


@register("pre")
class PreNormBlock(Block):
    """Pre-Norm (the OLMo2-1B baseline): h = x + A(N(x)); x' = h + F(N(h))."""

    qk_norm = "full"
    final_norm = True

    def forward(self, x: torch.Tensor, att: AttentionInputs) -> BlockOutput:
        h = x + self.attention(self.attn_norm(x), att)
        f, aux = self.feed_forward(self.ff_norm(h))
        return h + f, aux


@register("post")
class PostNormBlock(Block):
    """Post-Norm (Vaswani et al.): h = N(x + A(x)); x' = N(h + F(h))."""

    residual_scale = 1.0

    def forward(self, x: torch.Tensor, att: AttentionInputs) -> BlockOutput:
        a = self.residual_scale
        h = self.attn_norm(a * x + self.attention(x, att))
        f, aux = self.feed_forward(h)
        return self.ff_norm(a * h + f), aux


@register("deepnorm")
class DeepNormBlock(PostNormBlock):
    """DeepNorm (DeepNet): Post-Norm with the residual scaled by a = (2L)^(1/4); init gain (8L)^(-1/4)."""

    init_scheme = "deepnorm"

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.residual_scale = deepnorm_alpha(cfg.n_layers)


def deepnorm_alpha(n_layers: int) -> float:
    return (2 * n_layers) ** 0.25


def deepnorm_beta(n_layers: int) -> float:
    return (8 * n_layers) ** -0.25


@register("reordered")
class ReorderedNormBlock(Block):
    """OLMo2's reordered norm: h = x + N(A(x)); x' = h + N(F(h))."""

    qk_norm = "full"
    final_norm = True

    def forward(self, x: torch.Tensor, att: AttentionInputs) -> BlockOutput:
        h = x + self.attn_norm(self.attention(x, att))
        f, aux = self.feed_forward(h)
        return h + self.ff_norm(f), aux


@register("sdd")
class SDDBlock(Block):
    """The paper's SDD Post-Norm block: a = N1(x); h = a + A_sdd(a); f = N2(h); x' = f + F_sdd(f).

    The next block's N1 completes the post-norm of this block's output (the first block's N1 is
    the embedding norm) and a final N precedes the head.
    """

    qk_norm = "head"
    sdd = True
    final_norm = True
    init_scheme = "sdd"

    def forward(self, x: torch.Tensor, att: AttentionInputs) -> BlockOutput:
        a = self.attn_norm(x)
        h = a + self.attention(a, att)
        f = self.ff_norm(h)
        y, aux = self.feed_forward(f)
        return f + y, aux


@register("sdd_pre")
class SDDPreNormBlock(PreNormBlock):
    """SDD layers inside a Pre-Norm block (paper Fig. 8): h = x + A_sdd(N(x)); x' = h + F_sdd(N(h))."""

    qk_norm = "head"
    sdd = True
    init_scheme = "sdd"


@register("spannorm")
class SpanNormBlock(Block):
    """SpanNorm, our reading of the abstract (arXiv 2601.22580), not the authors' code.

    One clean residual spans the block and one PostNorm-style norm closes it:
    h = b*x + A(N1(x)); u = h + F(N2(h)); x' = N_out(u), with b = ``model.spannorm.residual_scale``.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.out_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.residual_scale = cfg.spannorm.residual_scale

    def forward(self, x: torch.Tensor, att: AttentionInputs) -> BlockOutput:
        h = self.residual_scale * x + self.attention(self.attn_norm(x), att)
        f, aux = self.feed_forward(self.ff_norm(h))
        return self.out_norm(h + f), aux


@register("peri")
class PeriNormBlock(Block):
    """Peri-LN (Kim et al. 2025, arXiv 2502.02732; OLMo-core's peri block): each sublayer between an
    input and an output norm, h = x + N_o(A(N_i(x))); x' = h + N_o'(F(N_i'(h))); a final N.

    Choices the paper leaves to us: QK-norm as ``pre``'s (full; so that peri differs from pre only in the
    output norms, ``model.qk_norm`` overrides), the embedding output not normalised (as OLMo-core).
    """

    qk_norm = "full"
    final_norm = True

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.post_ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x: torch.Tensor, att: AttentionInputs) -> BlockOutput:
        h = x + self.post_attn_norm(self.attention(self.attn_norm(x), att))
        f, aux = self.feed_forward(self.ff_norm(h))
        return h + self.post_ff_norm(f), aux


@register("lns")
class LayerNormScalingBlock(PreNormBlock):
    """LayerNorm Scaling (Sun et al. 2025, "The Curse of Depth", arXiv 2502.05795): Pre-Norm with each
    sublayer's input norm scaled by 1/sqrt(l) for the l-th block (l from 1):
    h = x + A(N(x) / sqrt(l)); x' = h + F(N(h) / sqrt(l)). QK-norm as ``pre``'s.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.norm_scale = (layer_id + 1) ** -0.5

    def forward(self, x: torch.Tensor, att: AttentionInputs) -> BlockOutput:
        h = x + self.attention(self.attn_norm(x) * self.norm_scale, att)
        f, aux = self.feed_forward(self.ff_norm(h) * self.norm_scale)
        return h + f, aux


@register("mixln")
class MixLNBlock(Block):
    """Mix-LN (Li et al. 2024, arXiv 2412.13795): Post-Norm in the first floor(f L) blocks,
    h = N(x + A(x)); x' = N(h + F(h)), Pre-Norm in the rest, h = x + A(N(x)); x' = h + F(N(h));
    f = ``model.mixln.post_fraction`` (0.25, the paper's). A final N (the last blocks are Pre-Norm);
    no QK-norm (the paper's LLaMA blocks).
    """

    final_norm = True

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.post = layer_id < math.floor(cfg.mixln.post_fraction * cfg.n_layers + 1e-9)  # 0.57 x 100 is 57

    def forward(self, x: torch.Tensor, att: AttentionInputs) -> BlockOutput:
        if self.post:
            h = self.attn_norm(x + self.attention(x, att))
            f, aux = self.feed_forward(h)
            return self.ff_norm(h + f), aux
        h = x + self.attention(self.attn_norm(x), att)
        f, aux = self.feed_forward(self.ff_norm(h))
        return h + f, aux


@register("rezero")
class ReZeroBlock(Block):
    """ReZero (Bachlechner et al. 2020, arXiv 2003.04887): no norms, one learned residual gate per block,
    zero at init (so every block starts as the identity), on both sublayers as the authors' code has it:
    h = x + g A(x); x' = h + g F(h). The degenerate baseline: what the norms buy. SkipInit (De & Smith
    2020) is the same gate without the sharing.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.attn_norm = self.ff_norm = None
        self.residual_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, att: AttentionInputs) -> BlockOutput:
        h = x + self.residual_gate * self.attention(x, att)
        f, aux = self.feed_forward(h)
        return h + self.residual_gate * f, aux


@register("hybridnorm")
class HybridNormBlock(Block):
    """HybridNorm (Zhuo et al. 2025, arXiv 2503.04598): QKV-norm inside attention and no norm on its input,
    Post-Norm around the FFN with the residual taken after the norm (the authors' dense config:
    ``use_{query,key,value}_norm``, ``attn_norm: false``, ``ffn_residual_after_norm: true``):
    h = x + A_qkv(x); f = N(h); x' = f + F(f); a final N. Not built: HybridNorm*, whose first block is
    Pre-Norm.
    """

    qk_norm = "full"
    v_norm = True
    final_norm = True

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.attn_norm = None

    def forward(self, x: torch.Tensor, att: AttentionInputs) -> BlockOutput:
        h = x + self.attention(x, att)
        f = self.ff_norm(h)
        y, aux = self.feed_forward(f)
        return f + y, aux


@register("ngpt")
class NGPTBlock(Block):
    """nGPT (Loshchilov et al. 2024, arXiv 2410.01131; layers in :mod:`sdd_train.model.ngpt`): the stream
    on the unit sphere, each sublayer a step towards its normalised output with a learned eigen learning
    rate per feature (|alpha|, init 0.05, scaling 1/sqrt(d_model)); N is the L2 norm over d_model, no gain:
    h = N(x + |a_A| (N(A(x)) - x)); x' = N(h + |a_M| (N(F(h)) - h)). No final norm: the logits are
    s_z * (E_out h). The embedding is not normalised in the forward; its rows, the head's and every
    matrix's along d_model are unit vectors after each optimizer step. Untied head, dense FFN, SP only.
    """

    normalized = True

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.attention = NormalizedAttention(cfg, layer_id)
        self.feed_forward = NormalizedFeedForward(cfg)
        self.attn_norm = self.ff_norm = None
        self.attn_rate = Scale(cfg.d_model, 0.05, cfg.d_model**-0.5)
        self.ff_rate = Scale(cfg.d_model, 0.05, cfg.d_model**-0.5)

    def forward(self, x: torch.Tensor, att: AttentionInputs) -> BlockOutput:
        h = l2_normalize(x + self.attn_rate().abs() * (l2_normalize(self.attention(x, att)) - x))
        f, aux = self.feed_forward(h)
        return l2_normalize(h + self.ff_rate().abs() * (l2_normalize(f) - h)), aux

    @classmethod
    def config_problem(cls, cfg: ModelConfig) -> str | None:
        if cfg.tie_embeddings:
            return ("model.tie_embeddings: ngpt has its own output embedding (the paper's); "
                    "set model.tie_embeddings=false")
        if cfg.ffn != "dense":
            return f"model.ffn: ngpt is defined for the dense SwiGLU, not '{cfg.ffn}'; set model.ffn=dense"
        if cfg.qk_norm != "auto":
            return "model.qk_norm: ngpt normalises q and k itself (per head, L2); set model.qk_norm=auto"
        if cfg.parametrization != "sp":
            return "model.parametrization: ngpt has its own scalings, not muP's; set model.parametrization=sp"
        return None

    def project_weights_(self) -> None:
        self.attention.project_weights_()
        self.feed_forward.project_weights_()
