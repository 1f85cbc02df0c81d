"""Feed-forward sublayers, registered by name (``model.ffn``): dense SwiGLU and the MoE.

A feed-forward is built as ``cls(cfg, sdd=...)`` and maps [B, S, d] to ([B, S, d], what it reports:
:class:`MoEAux` for the MoE, None for the dense SwiGLU). Its
projections are named ``ff_proj`` (input side) and ``ff_out`` (output side) so that
initialisation and per-layer diagnostics find them in every variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdd_train.config import ModelConfig
from sdd_train.kernels import sdd_swiglu
from sdd_train.model.layers import SDDLinear, linear
from sdd_train.model.moe import MoE, MoEAux


class SwiGLU(nn.Module):
    """``ff_out(silu(gate) * up)`` with up and gate from one fused projection of width 2*hidden.

    With ``sdd=True`` both projections are SDD layers (the paper's F_sdd); the fused up+gate
    vector gets one norm (reference) or one per branch (``model.sdd_ffn_norm=per_branch``), fused
    with the SwiGLU in :func:`sdd_train.kernels.sdd_swiglu`.
    """

    def __init__(self, cfg: ModelConfig, sdd: bool):
        super().__init__()
        groups = 2 if cfg.sdd_ffn_norm == "per_branch" else 1
        self.ff_proj = linear(cfg.d_model, 2 * cfg.ffn_hidden, sdd, cfg.norm_eps, norm_groups=groups)
        self.ff_out = linear(cfg.ffn_hidden, cfg.d_model, sdd, cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux | None]:
        proj = self.ff_proj
        if isinstance(proj, SDDLinear):
            return self.ff_out(sdd_swiglu(F.linear(x, proj.weight), proj.alpha, proj.eps, proj.norm_groups)), None
        up, gate = proj(x).chunk(2, dim=-1)
        return self.ff_out(F.silu(gate) * up), None


FEED_FORWARDS: dict[str, type[nn.Module]] = {"dense": SwiGLU, "moe": MoE}


def build_feed_forward(cfg: ModelConfig, sdd: bool) -> nn.Module:
    return FEED_FORWARDS[cfg.ffn](cfg, sdd=sdd)
