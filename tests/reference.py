"""Float64 reference implementations written from SPEC sections 1-3, independent of the model code.

They read parameters from a model but recompute everything with plain tensor algebra: explicit
softmax attention with a causal mask and repeated k/v heads, RoPE from its angle formula, and
each block scheme as the formula in the SPEC.
"""

from __future__ import annotations

import math

import torch


def rms(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return gain * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, S, H, D]: rotate pairs (i, i + D/2) by angle pos * theta^(-2i/D)."""
    _, s, _, d = x.shape
    pos = torch.arange(s, dtype=torch.float64)
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = (pos[:, None] * inv[None, :])[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], dim=-1)


def attention(x: torch.Tensor, attn, cfg) -> torch.Tensor:
    """Reference attention sublayer A (or A_sdd when the module has a context norm)."""
    b, s, d = x.shape
    hd, nh, nkv, eps = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.norm_eps
    w = attn.att_proj.weight
    q, k, v = x @ w[:d].T, x @ w[d : d + nkv * hd].T, x @ w[d + nkv * hd :].T
    if attn.qk_norm == "full":
        q, k = rms(q, attn.q_norm.weight, eps), rms(k, attn.k_norm.weight, eps)
    q, k, v = q.view(b, s, nh, hd), k.view(b, s, nkv, hd), v.view(b, s, nkv, hd)
    if attn.qk_norm == "head":
        q, k = rms(q, attn.q_norm.weight, eps), rms(k, attn.k_norm.weight, eps)
    q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
    rep = nh // nkv
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    ctx = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d)
    if attn.context_norm is not None:
        ctx = rms(ctx, attn.context_norm.weight, eps)
    return output_projection(ctx, attn.attn_out, eps)


def output_projection(x: torch.Tensor, layer, eps: float, groups: int = 1) -> torch.Tensor:
    y = x @ layer.weight.T
    if not hasattr(layer, "alpha"):
        return y
    if groups == 1:
        return rms(y, layer.alpha, eps)
    parts = y.chunk(groups, dim=-1)
    gains = layer.alpha.chunk(groups)
    return torch.cat([rms(p, g, eps) for p, g in zip(parts, gains)], dim=-1)


def feed_forward(x: torch.Tensor, ffn, cfg) -> torch.Tensor:
    groups = 2 if cfg.sdd_ffn_norm == "per_branch" else 1
    u = output_projection(x, ffn.ff_proj, cfg.norm_eps, groups)
    up, gate = u[..., : cfg.ffn_hidden], u[..., cfg.ffn_hidden :]
    h = gate * torch.sigmoid(gate) * up
    return output_projection(h, ffn.ff_out, cfg.norm_eps)


def block(x: torch.Tensor, blk, cfg) -> torch.Tensor:
    eps = cfg.norm_eps
    n1 = lambda t: rms(t, blk.attn_norm.weight, eps)  # noqa: E731
    n2 = lambda t: rms(t, blk.ff_norm.weight, eps)  # noqa: E731
    a_ = lambda t: attention(t, blk.attention, cfg)  # noqa: E731
    f_ = lambda t: feed_forward(t, blk.feed_forward, cfg)  # noqa: E731
    scheme = cfg.block
    if scheme in ("pre", "sdd_pre"):
        h = x + a_(n1(x))
        return h + f_(n2(h))
    if scheme in ("post", "deepnorm"):
        a = (2 * cfg.n_layers) ** 0.25 if scheme == "deepnorm" else 1.0
        h = n1(a * x + a_(x))
        return n2(a * h + f_(h))
    if scheme == "reordered":
        h = x + n1(a_(x))
        return h + n2(f_(h))
    if scheme == "sdd":
        a = n1(x)
        h = a + a_(a)
        f = n2(h)
        return f + f_(f)
    if scheme == "spannorm":
        h = cfg.spannorm.residual_scale * x + a_(n1(x))
        u = h + f_(n2(h))
        return rms(u, blk.out_norm.weight, eps)
    raise ValueError(scheme)


def transformer(tokens: torch.Tensor, model, cfg) -> torch.Tensor:
    x = model.embed.weight[tokens]
    for blk in model.blocks:
        x = block(x, blk, cfg)
    if model.final_norm is not None:
        x = rms(x, model.final_norm.weight, cfg.norm_eps)
    head = model.embed.weight if model.lm_head is None else model.lm_head.weight
    return x @ head.T
