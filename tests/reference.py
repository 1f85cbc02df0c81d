"""Float64 reference implementations written from SPEC sections 1-3 and 6, independent of the model code.

The structure of each block scheme (QK-norm, SDD layers, final norm, residual scale) comes from
:data:`SCHEMES` and the config, never from the model: the model only supplies parameter values,
looked up by name in a state dict. :func:`check_structure` asserts that the state dict holds exactly
the parameters (names and shapes) that structure implies, so a Pre-Norm model built with SDD layers
or the wrong QK-norm fails instead of being mirrored. Everything is recomputed with plain tensor
algebra: explicit softmax attention with a causal mask and repeated k/v heads, RoPE from its angle
formula, every MoE expert on every token weighted by the top-k router probabilities (zero elsewhere),
and each block scheme as its SPEC formula.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdd_train.config import ModelConfig

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Scheme:
    """A block scheme's structure (SPEC section 3; README "Block schemes")."""

    qk_norm: str  # when model.qk_norm=auto: 'none', 'head' (over head_dim, gain shared by heads), 'full'
    sdd: bool  # A_sdd / F_sdd (SPEC section 2): context norm + SDD output projection, SDD FFN projections
    final_norm: bool  # an RMSNorm before the LM head
    out_norm: bool = False  # SpanNorm's N_out closing the block
    post_norms: bool = False  # Peri-LN's norms on each sublayer's output
    norms: bool = True  # the two sublayer norms (ReZero has none, and a residual gate instead)
    v_norm: bool = False  # HybridNorm's norm on the attention's values (over all KV features)
    attn_norm: bool = True  # the attention's input norm (HybridNorm has only the FFN's)
    ngpt: bool = False  # nGPT: L2 norms, scaling vectors and eigen learning rates instead of gains; logit scale


SCHEMES: dict[str, Scheme] = {
    "pre": Scheme("full", sdd=False, final_norm=True),
    "post": Scheme("none", sdd=False, final_norm=False),
    "deepnorm": Scheme("none", sdd=False, final_norm=False),
    "reordered": Scheme("full", sdd=False, final_norm=True),
    "sdd": Scheme("head", sdd=True, final_norm=True),
    "sdd_pre": Scheme("head", sdd=True, final_norm=True),
    "spannorm": Scheme("none", sdd=False, final_norm=False, out_norm=True),
    "peri": Scheme("full", sdd=False, final_norm=True, post_norms=True),
    "lns": Scheme("full", sdd=False, final_norm=True),
    "mixln": Scheme("none", sdd=False, final_norm=True),
    "rezero": Scheme("none", sdd=False, final_norm=False, norms=False),
    "hybridnorm": Scheme("full", sdd=False, final_norm=True, v_norm=True, attn_norm=False),
    "ngpt": Scheme("none", sdd=False, final_norm=False, norms=False, ngpt=True),
}

# nGPT's scaling vectors: stored value s, used as s * init_value / init_scaling (paper section 2.6; d = d_model)
NGPT_SCALES = {"q_gain": lambda d: d**0.5, "k_gain": lambda d: d**0.5, "up_gain": lambda d: 1.0,
               "gate_gain": lambda d: 1.0, "attn_rate": lambda d: 0.05 * d**0.5, "ff_rate": lambda d: 0.05 * d**0.5,
               "logit_gain": lambda d: d**0.5}


def ngpt_scale(p: State, name: str, cfg: ModelConfig) -> torch.Tensor:
    return p[f"{name}.weight"] * NGPT_SCALES[name.rsplit(".", 1)[-1]](cfg.d_model)


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the last dim."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True))


def qk_norm(cfg: ModelConfig) -> str:
    return SCHEMES[cfg.block].qk_norm if cfg.qk_norm == "auto" else cfg.qk_norm


def residual_scale(cfg: ModelConfig) -> float:
    """The multiplier of the residual stream: DeepNorm's a = (2L)^(1/4), SpanNorm's b (config)."""
    if cfg.block == "deepnorm":
        return (2 * cfg.n_layers) ** 0.25
    if cfg.block == "spannorm":
        return cfg.spannorm.residual_scale
    return 1.0


# --------------------------------------------------------------------------- structure


def block_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of one block, as the scheme and config imply."""
    s = SCHEMES[cfg.block]
    d, hd, kv = cfg.d_model, cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"attention.att_proj.weight": (d + 2 * kv, d), "attention.attn_out.weight": (d, d)}
    if s.ngpt:
        shapes.update({"attention.q_gain.weight": (d,), "attention.k_gain.weight": (kv,),
                       "attn_rate.weight": (d,), "ff_rate.weight": (d,)})
    elif s.norms:
        shapes.update({"attn_norm.weight": (d,), "ff_norm.weight": (d,)})
    else:
        shapes["residual_gate"] = (1,)
    if not s.attn_norm:
        del shapes["attn_norm.weight"]
    if s.v_norm:
        shapes["attention.v_norm.weight"] = (kv,)
    qk = qk_norm(cfg)
    if qk != "none":
        shapes["attention.q_norm.weight"] = (hd,) if qk == "head" else (d,)
        shapes["attention.k_norm.weight"] = (hd,) if qk == "head" else (kv,)
    if s.sdd:
        shapes["attention.context_norm.weight"] = (d,)
        shapes["attention.attn_out.alpha"] = (d,)
    if s.out_norm:
        shapes["out_norm.weight"] = (d,)
    if s.post_norms:
        shapes["post_attn_norm.weight"] = (d,)
        shapes["post_ff_norm.weight"] = (d,)
    if cfg.ffn == "moe":
        e, h = cfg.moe.n_experts, cfg.moe.expert_hidden
        ffn = {"router.weight": (e, d), "ff_proj.weight": (e, 2 * h, d), "ff_out.weight": (e, d, h)}
        if s.sdd:
            ffn.update({"ff_proj.alpha": (e, 2 * h), "ff_out.alpha": (e, d)})
    else:
        h = cfg.ffn_hidden
        ffn = {"ff_proj.weight": (2 * h, d), "ff_out.weight": (d, h)}
        if s.ngpt:
            ffn.update({"up_gain.weight": (h,), "gate_gain.weight": (h,)})
        if s.sdd:
            ffn.update({"ff_proj.alpha": (2 * h,), "ff_out.alpha": (d,)})
    shapes.update({f"feed_forward.{k}": v for k, v in ffn.items()})
    return shapes


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the whole model."""
    shapes = {"embed.weight": (cfg.vocab_size, cfg.d_model)}
    for i in range(cfg.n_layers):
        shapes.update({f"blocks.{i}.{k}": v for k, v in block_shapes(cfg).items()})
    if SCHEMES[cfg.block].final_norm:
        shapes["final_norm.weight"] = (cfg.d_model,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.d_model)
    if SCHEMES[cfg.block].ngpt:
        shapes["logit_gain.weight"] = (cfg.vocab_size,)
    return shapes


def check_structure(state: State, expected: dict[str, tuple[int, ...]]) -> None:
    """The model has exactly the expected parameters: an extra ``alpha`` or ``context_norm`` (SDD
    layers in a plain scheme), a missing QK-norm or one of the wrong kind all fail here."""
    got = {k: tuple(v.shape) for k, v in state.items()}
    extra = sorted(set(got) - set(expected))
    missing = sorted(set(expected) - set(got))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    assert not (extra or missing or wrong), f"structure differs from SPEC: extra {extra}, missing {missing}, " \
        f"wrong shape {[(k, got[k], expected[k]) for k in wrong]}"


def sub_state(state: State, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- layers


def rms(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return gain * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def grouped_rms(x: torch.Tensor, gain: torch.Tensor, eps: float, groups: int) -> torch.Tensor:
    """rms within each of ``groups`` equal chunks of the last dim (gain chunked alike)."""
    parts = zip(x.chunk(groups, dim=-1), gain.chunk(groups, dim=-1))
    return torch.cat([rms(p, g, eps) for p, g in parts], dim=-1)


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, S, H, D]: rotate pairs (i, i + D/2) by angle pos * theta^(-2i/D)."""
    _, s, _, d = x.shape
    pos = torch.arange(s, dtype=torch.float64)
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = (pos[:, None] * inv[None, :])[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], dim=-1)


def attention(x: torch.Tensor, p: State, cfg: ModelConfig) -> torch.Tensor:
    """The attention sublayer A, or A_sdd in an SDD scheme; ``p``: the block's ``attention.*`` values."""
    b, s, d = x.shape
    hd, nh, nkv, eps = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.norm_eps
    w = p["att_proj.weight"]
    q, k, v = x @ w[:d].T, x @ w[d : d + nkv * hd].T, x @ w[d + nkv * hd :].T
    qk = qk_norm(cfg)
    if qk == "full":
        q, k = rms(q, p["q_norm.weight"], eps), rms(k, p["k_norm.weight"], eps)
    if SCHEMES[cfg.block].v_norm:
        v = rms(v, p["v_norm.weight"], eps)
    q, k, v = q.view(b, s, nh, hd), k.view(b, s, nkv, hd), v.view(b, s, nkv, hd)
    if qk == "head":
        q, k = rms(q, p["q_norm.weight"], eps), rms(k, p["k_norm.weight"], eps)
    softmax_scale = 1 / math.sqrt(hd)
    if SCHEMES[cfg.block].ngpt:  # unit q and k per head times s_q / s_k, then RoPE; q.k scaled by sqrt(hd)
        q = unit(q) * ngpt_scale(p, "q_gain", cfg).view(nh, hd)
        k = unit(k) * ngpt_scale(p, "k_gain", cfg).view(nkv, hd)
        softmax_scale = math.sqrt(hd)
    q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
    rep = nh // nkv
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    ctx = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d)
    if not SCHEMES[cfg.block].sdd:
        return ctx @ p["attn_out.weight"].T
    ctx = rms(ctx, p["context_norm.weight"], eps)
    return rms(ctx @ p["attn_out.weight"].T, p["attn_out.alpha"], eps)


def swiglu(x: torch.Tensor, p: State, cfg: ModelConfig) -> torch.Tensor:
    """The dense FFN F, or F_sdd (one norm over the fused up+gate vector, or one per branch)."""
    sdd, eps = SCHEMES[cfg.block].sdd, cfg.norm_eps
    u = x @ p["ff_proj.weight"].T
    if sdd:
        u = grouped_rms(u, p["ff_proj.alpha"], eps, 2 if cfg.sdd_ffn_norm == "per_branch" else 1)
    up, gate = u.chunk(2, dim=-1)
    if SCHEMES[cfg.block].ngpt:  # u s_u, v s_v sqrt(d)
        up = up * ngpt_scale(p, "up_gain", cfg)
        gate = gate * ngpt_scale(p, "gate_gain", cfg) * math.sqrt(cfg.d_model)
    y = (F.silu(gate) * up) @ p["ff_out.weight"].T
    return rms(y, p["ff_out.alpha"], eps) if sdd else y


def moe(x: torch.Tensor, p: State, cfg: ModelConfig) -> torch.Tensor:
    """SPEC section 6: softmax router over all experts, top-k combine weights (raw or renormalised);
    SDD experts normalise each branch and the output (``g_out`` times ``sdd_out_gain_scale``)."""
    m, sdd, eps = cfg.moe, SCHEMES[cfg.block].sdd, cfg.norm_eps
    probs = (x @ p["router.weight"].T).softmax(-1)  # [..., E]
    top, experts = probs.topk(m.top_k, dim=-1)
    if m.renormalize:
        top = top / top.sum(-1, keepdim=True)
    combine = torch.zeros_like(probs).scatter(-1, experts, top)
    u = torch.einsum("...d,eod->...eo", x, p["ff_proj.weight"])  # every expert on every token
    if sdd:
        u = grouped_rms(u, p["ff_proj.alpha"], eps, 2)
    up, gate = u.chunk(2, dim=-1)
    y = torch.einsum("...eh,eoh->...eo", F.silu(gate) * up, p["ff_out.weight"])
    if sdd:
        y = rms(y, p["ff_out.alpha"] * m.sdd_out_gain_scale, eps)
    return torch.einsum("...e,...eo->...o", combine, y)


def block(x: torch.Tensor, p: State, cfg: ModelConfig, layer: int = 0) -> torch.Tensor:
    """Block ``layer`` (from 0) of ``cfg.block`` with the parameter values ``p`` (a block's state dict)."""
    check_structure(p, block_shapes(cfg))
    eps, b = cfg.norm_eps, residual_scale(cfg)
    n1 = lambda t: rms(t, p["attn_norm.weight"], eps)  # noqa: E731
    n2 = lambda t: rms(t, p["ff_norm.weight"], eps)  # noqa: E731
    a_ = lambda t: attention(t, sub_state(p, "attention."), cfg)  # noqa: E731
    ffn = moe if cfg.ffn == "moe" else swiglu
    f_ = lambda t: ffn(t, sub_state(p, "feed_forward."), cfg)  # noqa: E731
    scheme = cfg.block
    if scheme in ("pre", "sdd_pre"):
        h = x + a_(n1(x))
        return h + f_(n2(h))
    if scheme in ("post", "deepnorm"):
        h = n1(b * x + a_(x))
        return n2(b * h + f_(h))
    if scheme == "reordered":
        h = x + n1(a_(x))
        return h + n2(f_(h))
    if scheme == "sdd":
        a = n1(x)
        h = a + a_(a)
        f = n2(h)
        return f + f_(f)
    if scheme == "spannorm":
        h = b * x + a_(n1(x))
        u = h + f_(n2(h))
        return rms(u, p["out_norm.weight"], eps)
    if scheme == "peri":  # Peri-LN: x + N_out(sublayer(N_in(x)))
        h = x + rms(a_(n1(x)), p["post_attn_norm.weight"], eps)
        return h + rms(f_(n2(h)), p["post_ff_norm.weight"], eps)
    if scheme == "lns":  # LayerNorm Scaling: the l-th block's (l from 1) input norms / sqrt(l)
        s = 1.0 / math.sqrt(layer + 1)
        h = x + a_(s * n1(x))
        return h + f_(s * n2(h))
    if scheme == "mixln":  # Post-Norm for the first floor(f L) blocks, Pre-Norm after
        if layer < round(cfg.mixln.post_fraction * cfg.n_layers * 1e6) // 10**6:  # exact for 6-digit fractions
            h = n1(x + a_(x))
            return n2(h + f_(h))
        h = x + a_(n1(x))
        return h + f_(n2(h))
    if scheme == "hybridnorm":  # QKV-norm attention on the raw stream; the FFN's residual after its norm
        h = x + a_(x)
        f = n2(h)
        return f + f_(f)
    if scheme == "rezero":  # no norms; one gate on both residual branches
        g = p["residual_gate"]
        h = x + g * a_(x)
        return h + g * f_(h)
    if scheme == "ngpt":  # a step of |alpha| from the stream towards each sublayer's unit output, back on the sphere
        a_rate, f_rate = ngpt_scale(p, "attn_rate", cfg).abs(), ngpt_scale(p, "ff_rate", cfg).abs()
        h = unit(x + a_rate * (unit(a_(x)) - x))
        return unit(h + f_rate * (unit(f_(h)) - h))
    raise ValueError(scheme)


def transformer(tokens: torch.Tensor, state: State, cfg: ModelConfig) -> torch.Tensor:
    """Logits of the whole model with the parameter values ``state`` (a model's state dict)."""
    check_structure(state, model_shapes(cfg))
    x = state["embed.weight"][tokens]
    for i in range(cfg.n_layers):
        x = block(x, sub_state(state, f"blocks.{i}."), cfg, i)
    if SCHEMES[cfg.block].final_norm:
        x = rms(x, state["final_norm.weight"], cfg.norm_eps)
    logits = x @ state["embed.weight" if cfg.tie_embeddings else "lm_head.weight"].T
    return logits * ngpt_scale(state, "logit_gain", cfg) if SCHEMES[cfg.block].ngpt else logits


@torch.no_grad()
def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for every parameter, so that a gain or a matrix in the wrong place changes the
    output: gains (norm weights, SDD alphas) uniform in [0.5, 1.5], matrices N(0, 0.2^2)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1 or name.endswith("alpha"):
            p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=torch.float64))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model
