"""nGPT's layers (Loshchilov et al. 2024, "nGPT: Normalized Transformer with Representation Learning on the
Hypersphere", arXiv 2410.01131): learned scaling vectors, the normalized attention and SwiGLU.

Every vector nGPT computes with lives on the unit sphere: the embedding's rows, the hidden states and
the rows of every matrix along d_model (:meth:`project_weights_` puts the matrices back after each
optimizer step). The scaling vectors restore the magnitudes the norms take away. The block that uses
these layers is ``ngpt`` in :mod:`sdd_train.model.blocks`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sdd_train.config import ModelConfig
from sdd_train.kernels import l2_normalize
from sdd_train.model.layers import Attention, apply_rope


class Scale(nn.Module):
    """A learned per-feature scaling vector, stored as ``init_scaling`` and used as
    ``weight * init_value / init_scaling`` (nGPT's s_a / s_init trick): its effective value starts at
    ``init_value``, and Adam, whose step is about the learning rate whatever the value, moves it
    ``init_value / init_scaling`` times faster than a plainly stored parameter would move."""

    def __init__(self, dim: int, init_value: float, init_scaling: float):
        super().__init__()
        self.init_value, self.init_scaling = init_value, init_scaling
        self.weight = nn.Parameter(torch.full((dim,), init_scaling))

    def forward(self) -> torch.Tensor:
        return self.weight * (self.init_value / self.init_scaling)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.fill_(self.init_scaling)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, init={self.init_value}, scaling={self.init_scaling:.4g}"


@torch.no_grad()
def normalize_(weight: torch.Tensor, dim: int) -> None:
    """Project ``weight`` in place onto unit vectors along ``dim`` (a sharded DTensor too)."""
    weight.copy_(l2_normalize(weight, dim))


class NormalizedAttention(Attention):
    """nGPT's attention: no QK-norm gains, q and k L2-normalised per head and scaled by s_q / s_k (init 1,
    scaling 1/sqrt(d_model)), then rotated by RoPE; softmax scale sqrt(head_dim) (a unit q.k is at most 1).

    Choices the paper leaves open: separate s_q [n_heads*head_dim] and s_k [n_kv_heads*head_dim] (as
    OLMo-core; the paper's one s_qk cannot serve GQA's fewer key heads), applied before RoPE (as OLMo-core;
    NVIDIA's code scales after it, which makes a score depend on absolute positions, not only on their
    distance), with the half-split RoPE every other scheme uses.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__(cfg, qk_norm="none", sdd=False, layer_id=layer_id)
        self.q_gain = Scale(cfg.d_model, 1.0, cfg.d_model**-0.5)
        self.k_gain = Scale(self.kv_dim, 1.0, cfg.d_model**-0.5)

    def queries_keys_values(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, s, d = x.shape
        q, k, v = self.att_proj(x).split([d, self.kv_dim, self.kv_dim], dim=-1)
        q, k = q.view(b, s, self.n_heads, self.head_dim), k.view(b, s, self.n_kv_heads, self.head_dim)
        # the attention kernel scales q.k by 1/sqrt(head_dim): head_dim more makes it nGPT's sqrt(head_dim)
        q_gain = self.q_gain().view(self.n_heads, self.head_dim) * self.head_dim
        k_gain = self.k_gain().view(self.n_kv_heads, self.head_dim)
        q = apply_rope((l2_normalize(q) * q_gain).to(q.dtype), rope)
        k = apply_rope((l2_normalize(k) * k_gain).to(k.dtype), rope)
        return q, k, v.view(b, s, self.n_kv_heads, self.head_dim)

    def project_weights_(self) -> None:
        normalize_(self.att_proj.weight, dim=-1)  # q, k, v rows: each reads the d_model-sized stream
        normalize_(self.attn_out.weight, dim=0)  # columns: each head feature writes a d_model-sized vector


class NormalizedFeedForward(nn.Module):
    """nGPT's SwiGLU: ``ff_out(silu(gate * s_v * sqrt(d_model)) * up * s_u)``, s_u and s_v init 1 (scaling 1).

    The paper's formula (u * s_u, v * s_v * sqrt(d_model)); NVIDIA's code scales up by sqrt(d_model) too,
    a constant the block's norm of the output removes.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ff_proj = nn.Linear(cfg.d_model, 2 * cfg.ffn_hidden, bias=False)  # up, gate
        self.ff_out = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)
        self.up_gain = Scale(cfg.ffn_hidden, 1.0, 1.0)
        self.gate_gain = Scale(cfg.ffn_hidden, 1.0, 1.0)
        self.gate_mult = math.sqrt(cfg.d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        up, gate = self.ff_proj(x).chunk(2, dim=-1)
        hidden = F.silu(gate * (self.gate_gain() * self.gate_mult)) * (up * self.up_gain())
        return self.ff_out(hidden.to(up.dtype)), None

    def project_weights_(self) -> None:
        normalize_(self.ff_proj.weight, dim=-1)
        normalize_(self.ff_out.weight, dim=0)
