"""Building blocks shared by every block scheme: RMSNorm, the SDD linear layer, RoPE, attention.

Norms compute in fp32 and cast back, so bf16 autocast never normalises in low precision.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdd_train.config import ModelConfig
from sdd_train.kernels import AttentionMask, causal_attention, rms_norm, upcast
from sdd_train.model.mup import query_scale


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-feature gain, no bias, no mean subtraction."""

    def __init__(self, dim: int, eps: float = 1e-5, groups: int = 1):
        super().__init__()
        if dim % groups:
            raise ValueError(f"RMSNorm: dim {dim} not divisible into {groups} groups")
        self.eps, self.groups = eps, groups
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.groups)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (f", groups={self.groups}" if self.groups > 1 else "")


class SDDLinear(nn.Module):
    """Scale-Distribution Decoupling: ``y = alpha * rms(V x)``.

    The norm over the output features fixes the distribution, so the output does not depend on the
    scale of ``V`` (``weight``); the learned ``alpha`` carries the scale. ``norm_groups=2`` normalises
    each half separately (the per-branch variant of the fused SwiGLU up+gate projection).
    """

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5, norm_groups: int = 1):
        super().__init__()
        if out_features % norm_groups:
            raise ValueError(f"SDDLinear: {out_features} outputs not divisible into {norm_groups} groups")
        self.eps, self.norm_groups = eps, norm_groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.alpha = nn.Parameter(torch.ones(out_features))
        nn.init.normal_(self.weight, std=in_features**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(F.linear(x, self.weight), self.alpha, self.eps, self.norm_groups)

    def extra_repr(self) -> str:
        out, inp = self.weight.shape
        return f"in={inp}, out={out}, eps={self.eps}" + (f", norm_groups={self.norm_groups}" if self.norm_groups > 1 else "")


def linear(in_features: int, out_features: int, sdd: bool, eps: float, norm_groups: int = 1) -> nn.Module:
    """A bias-free projection, SDD or plain."""
    if sdd:
        return SDDLinear(in_features, out_features, eps, norm_groups)
    return nn.Linear(in_features, out_features, bias=False)


# --------------------------------------------------------------------------- RoPE


def rope_cache(seq_len: int, head_dim: int, theta: float, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """cos and sin of the rotary angles, stacked: [2, seq_len, head_dim] (angles computed in fp64,
    since fp32 angles at position 4096 are off by ~1e-4 rad)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos(), angles.sin()]).to(dtype)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, S, H, D] by the half-split convention (as OLMo2 and Llama in transformers)."""
    seq_len = x.shape[1]
    cos, sin = rope[0, :seq_len, None, :], rope[1, :seq_len, None, :]
    xf = upcast(x)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


# --------------------------------------------------------------------------- attention

class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding (all layers, one batch).

    Rows may be left-padded to a common length (``valid`` marks real tokens): RoPE depends only on
    relative positions, so a row's shift does not change its result, and padded keys are masked out.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, device: torch.device):
        self.n_layers, self.max_len, self.pos = n_layers, max_len, 0
        self.k: torch.Tensor | None = None  # [n_layers, B, max_len, Hkv, D], allocated at the first update
        self.v: torch.Tensor | None = None
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's [B, s, Hkv, D] keys/values of ``layer``; return all of them so far."""
        end = self.pos + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        if self.k is None:  # in the compute dtype (bf16 under autocast)
            shape = (self.n_layers, k.shape[0], self.max_len, *k.shape[2:])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        self.k[layer, :, self.pos:end] = k
        self.v[layer, :, self.pos:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def mask(self, s: int) -> torch.Tensor:
        """[B, 1, s, pos+s]: causal over absolute positions, real keys only (a query always sees itself)."""
        end = self.pos + s
        query = torch.arange(self.pos, end, device=self.valid.device)[:, None]
        key = torch.arange(end, device=self.valid.device)[None, :]
        allowed = (key <= query)[None] & self.valid[:, None, :end]
        return (allowed | (key == query)[None]).unsqueeze(1)


@dataclass
class AttentionInputs:
    """What every block's attention takes besides its input, built once per forward: the RoPE table of
    these positions, the document mask in its backend's form, and the KV cache while decoding (each
    layer stores its keys and values there under its own index)."""

    rope: torch.Tensor
    mask: AttentionMask = None
    cache: KVCache | None = None


class Attention(nn.Module):
    """Multi-head attention with GQA, optional QK-norm (and a norm on the values) and RoPE.

    With ``sdd=True`` this is the paper's A_sdd: the attention context is RMS-normalised
    (``context_norm``) and the output projection is an SDD layer.
    """

    def __init__(self, cfg: ModelConfig, qk_norm: str, sdd: bool, layer_id: int = 0, v_norm: bool = False):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.layer_id = layer_id  # its slot in a KV cache
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.kv_dim = cfg.n_kv_heads * hd
        self.backend = cfg.attention_backend
        self.qk_norm = qk_norm
        self.att_proj = nn.Linear(d, d + 2 * self.kv_dim, bias=False)  # fused q, k, v
        if qk_norm == "head":  # one gain of size head_dim, shared by all heads
            self.q_norm: nn.Module | None = RMSNorm(hd, cfg.norm_eps)
            self.k_norm: nn.Module | None = RMSNorm(hd, cfg.norm_eps)
        elif qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(d, cfg.norm_eps), RMSNorm(self.kv_dim, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.v_norm = RMSNorm(self.kv_dim, cfg.norm_eps) if v_norm else None  # HybridNorm's value norm
        self.context_norm = RMSNorm(d, cfg.norm_eps) if sdd else None
        self.attn_out = linear(d, d, sdd, cfg.norm_eps)
        self.q_scale = query_scale(cfg)  # 1 but under µP: its softmax scale (sdd_train/model/mup.py)

    def forward(self, x: torch.Tensor, att: AttentionInputs) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.queries_keys_values(x, att.rope)
        mask = att.mask
        if att.cache is not None:
            k, v = att.cache.update(self.layer_id, k, v)
            mask = att.cache.mask(s)
        ctx = causal_attention(q, k, v, self.backend, mask).reshape(b, s, d)
        if self.context_norm is not None:
            ctx = self.context_norm(ctx)
        return self.attn_out(ctx)

    def queries_keys_values(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q [B, S, H, D] (its softmax scale applied but 1/sqrt(D)), k and v [B, S, Hkv, D] of ``x``."""
        b, s, d = x.shape
        q, k, v = self.att_proj(x).split([d, self.kv_dim, self.kv_dim], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.v_norm is not None:
            v = self.v_norm(v)
        q = q.view(b, s, self.n_heads, self.head_dim)
        k = k.view(b, s, self.n_kv_heads, self.head_dim)
        v = v.view(b, s, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        return q, k, v


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of the attention scores and context (PaLM's 12*L*d*S)."""
    return 12.0 * cfg.n_layers * cfg.d_model * seq_len


def init_full_(param: torch.Tensor, fill: Callable[[torch.Tensor], object]) -> None:
    """Run ``fill`` on the full (unsharded) value of ``param``.

    A plain tensor is filled in place. A sharded DTensor (FSDP2) gets a full-size scratch tensor
    filled with the same random stream and keeps its own shard of it, so initialisation is
    identical for every world size while only one parameter is ever materialised in full.
    """
    if type(param).__name__ != "DTensor":
        fill(param)
        return
    from torch.distributed.tensor import distribute_tensor

    full = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
    fill(full)
    # Every rank holds the same full tensor: from torch 2.7 each keeps its shard without
    # communicating (src_data_rank=None); before, rank 0's copy is scattered (the same values).
    local_only = "src_data_rank" in inspect.signature(distribute_tensor).parameters
    local = distribute_tensor(full, param.device_mesh, param.placements,
                              **({"src_data_rank": None} if local_only else {})).to_local()
    param.to_local().copy_(local)


def trunc_normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    """Truncated normal at +-3 std (OLMo2)."""
    return nn.init.trunc_normal_(t, mean=0.0, std=std, a=-3 * std, b=3 * std)


def xavier_normal_(t: torch.Tensor, gain: float) -> torch.Tensor:
    """Xavier normal over the last two dims ([out, in], or [experts, out, in] per expert)."""
    fan_out, fan_in = t.shape[-2:]
    return nn.init.normal_(t, std=gain * math.sqrt(2.0 / (fan_in + fan_out)))
