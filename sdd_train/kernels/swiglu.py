"""The SDD feed-forward's up+gate norm and SwiGLU: ``silu(gate) * up`` of ``[up | gate] = alpha * rms(u)``.

On CPU one C kernel each way (:mod:`sdd_train.kernels.cpu_sdd_swiglu`, eager and compiled); elsewhere
the norm (:func:`sdd_train.kernels.norm.rms_norm`) followed by the SwiGLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdd_train.kernels.cpu_sdd_swiglu import sdd_swiglu as cpu_sdd_swiglu
from sdd_train.kernels.norm import rms_norm
from sdd_train.kernels.settings import cpu_values


def sdd_swiglu(u: torch.Tensor, alpha: torch.Tensor, eps: float, groups: int = 1) -> torch.Tensor:
    """``silu(gate) * up`` with ``[up | gate] = alpha * rms(u)``, the mean over ``groups`` (1: the fused
    vector, the reference; 2: per branch) equal parts of the last dim of ``u`` [..., 2 * hidden]."""
    if cpu_values(u):
        return cpu_sdd_swiglu(u, alpha, eps, groups)
    return sdd_swiglu_torch(u, alpha, eps, groups)


def sdd_swiglu_torch(u: torch.Tensor, alpha: torch.Tensor, eps: float, groups: int = 1) -> torch.Tensor:
    """:func:`sdd_swiglu` as the norm (:func:`rms_norm`: Triton or PyTorch) followed by the SwiGLU."""
    up, gate = rms_norm(u, alpha, eps, groups).chunk(2, dim=-1)
    return F.silu(gate) * up
