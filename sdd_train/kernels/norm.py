"""RMSNorm x gain: which implementation runs, and the PyTorch one.

Every norm of the model goes through :func:`rms_norm`: the block norms, QK-norm (per head or over
all features) and the SDD norm after a projection (``alpha * rms(V x)``, per-branch as ``groups``).
Statistics are fp32 whatever the input dtype (fp64 stays fp64); the result has the input's dtype.
The MoE's SDD experts, whose gain differs per row (per expert), use :func:`row_gain_rms_norm`; nGPT's
projection onto the unit sphere is :func:`l2_normalize`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdd_train.kernels.cpu_rms_norm import cpu_rms_norm, use_cpu_norm
from sdd_train.kernels.precision import autocast_off, compute_dtype, upcast
from sdd_train.kernels.settings import cpu_values
from sdd_train.kernels.triton_rms_norm import fused_rms_norm, use_fused_norm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int = 1) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), the mean taken within each of ``groups`` equal chunks.

    In eager mode this is one fused kernel: Triton on CUDA (:mod:`sdd_train.kernels.triton_rms_norm`),
    C on CPU (:mod:`sdd_train.kernels.cpu_rms_norm`); elsewhere, and inside torch.compile (where
    inductor fuses it), :func:`rms_norm_torch`.
    """
    if use_fused_norm(x):
        return fused_rms_norm(x, weight, eps, groups)
    if use_cpu_norm(x):
        return cpu_rms_norm(x, weight, eps, groups)
    return rms_norm_torch(x, weight, eps, groups)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int = 1) -> torch.Tensor:
    """:func:`rms_norm` in PyTorch ops (the fallback, and what torch.compile fuses)."""
    return RMSNormFunction.apply(x, weight, eps, groups)


# Rows per step of the PyTorch-path norm on CPU: each elementwise op then streams ~2 MiB of fp32
# that stays in cache for the next op, instead of the whole [tokens, width] tensor through memory
# (the tiny model's SwiGLU-width SDD norm, fwd+bwd on the 2-core dev machine: 7.4 ms, ~20 ms on
# whole tensors or as composite ops; benchmarks/cpu_ops.py).
NORM_BLOCK_ELEMENTS = 1 << 19


def norm_row_blocks(x: torch.Tensor, rows: int, width: int) -> list[slice]:
    """The blocks of rows the norm works through: one (the whole tensor) on GPUs, which stream
    anyway, and inside torch.compile, where inductor fuses it and where no size arithmetic may
    reach the graph (torch 2.11's dynamo fails on it once shapes turn symbolic)."""
    if not cpu_values(x) or torch.compiler.is_compiling():
        return [slice(None)]
    step = max(NORM_BLOCK_ELEMENTS // width, 1)
    return [slice(s, s + step) for s in range(0, rows, step)]


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward: autograd through the composite ops runs ~3x as many
    elementwise kernels and keeps an upcast copy of the input; this keeps ``x`` in its own dtype and
    one inverse RMS per row and group. Computes in fp32 (fp64 stays fp64), on CPU in cache-sized
    blocks of rows with in-place ops."""

    @staticmethod
    @autocast_off
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int) -> torch.Tensor:
        x2 = x.reshape(-1, groups, x.shape[-1] // groups)
        n, _, d = x2.shape
        dtype = compute_dtype(x.dtype)
        w = weight.to(dtype).view(groups, d)
        y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty(n, groups, 1, dtype=dtype, device=x.device)
        for rows in norm_row_blocks(x, n, x.shape[-1]):
            xf = x2[rows].to(dtype, copy=True)
            r = torch.linalg.vecdot(xf, xf).unsqueeze_(-1).mul_(1.0 / d).add_(eps).rsqrt_()
            rstd[rows] = r
            y[rows] = xf.mul_(r).mul_(w)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    @autocast_off
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n, groups, d = x2.shape
        dtype = rstd.dtype
        w = weight.to(dtype).view(groups, d)
        dy2 = dy.reshape(x2.shape)
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        dw = torch.zeros(groups, d, dtype=dtype, device=x2.device) if ctx.needs_input_grad[1] else None
        for rows in norm_row_blocks(x2, n, groups * d):
            r = rstd[rows]
            x_hat = x2[rows].to(dtype, copy=True).mul_(r)
            dyf = dy2[rows].to(dtype, copy=True)
            if dw is not None:
                dw += (dyf * x_hat).sum(0)
            wdy = dyf.mul_(w)
            # d/dx of w * x * rstd: rstd * (w dy - x_hat * mean(x_hat * w dy))
            mean = torch.linalg.vecdot(x_hat, wdy).unsqueeze_(-1).mul_(1.0 / d)
            dx[rows] = wdy.sub_(x_hat.mul_(mean)).mul_(r)
        return dx.view(dy.shape), (dw.flatten().to(weight.dtype) if dw is not None else None), None, None


def row_gain_rms_norm(y: torch.Tensor, gain: torch.Tensor, eps: float, groups: int = 1) -> torch.Tensor:
    """``gain * rms(y)`` with a gain per row (``gain`` [rows, width]: each routed row's expert's
    ``alpha``), the mean within ``groups`` equal chunks; fp32 inside, the result in y's dtype."""
    yf = upcast(y).unflatten(-1, (groups, -1))
    normed = F.rms_norm(yf, (yf.shape[-1],), eps=eps).flatten(-2)
    return (normed * gain.to(normed.dtype)).to(y.dtype)


def l2_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x / ||x||`` along ``dim``, without an eps (nGPT's projection onto the unit sphere: a zero vector
    has no direction); fp32 inside, the result in x's dtype. Works on sharded DTensors (the norm along a
    sharded dim is reduced across ranks)."""
    xf = upcast(x)
    return (xf / torch.linalg.vector_norm(xf, dim=dim, keepdim=True)).to(x.dtype)
