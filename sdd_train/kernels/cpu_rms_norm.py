"""RMSNorm x gain on CPU in eager mode, forward and backward each one C kernel (``cpu_kernels.c``).

Why: the PyTorch path (:func:`sdd_train.kernels.norm.rms_norm_torch`) makes a few passes over each
block of rows (upcast, statistics, scale; the backward's row sums, input gradient and the gain's
column sum); the kernel reads a row once while it is in L1 (the forward also writes ``y``, the
backward ``dx`` and per-thread partial gain sums). A tiny eager block: `pre` ~10%, `sdd` (five
norms) ~19% faster (docs/benchmarks.md). Compiled graphs keep the PyTorch path, which inductor fuses
with its neighbours; there this kernel gained nothing.
"""

from __future__ import annotations

import ctypes

import torch

from sdd_train.kernels.cpu_kernels import kernel_for
from sdd_train.kernels.precision import autocast_off


def use_cpu_norm(x: torch.Tensor) -> bool:
    """True where :func:`cpu_rms_norm` runs: CPU fp32/bf16 outside torch.compile, the kernel built."""
    return not torch.compiler.is_compiling() and kernel_for(x) is not None


class _CPURMSNorm(torch.autograd.Function):
    """The library comes in with the inputs and goes to the backward with them, so both directions run
    the kernel the forward was dispatched to."""

    @staticmethod
    @autocast_off
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int, lib: ctypes.CDLL) -> torch.Tensor:
        width = x.shape[-1]
        x2, w = x.reshape(-1, width).contiguous(), weight.float().contiguous()
        rows = x2.shape[0]
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, groups, dtype=torch.float32)
        lib.rms_norm_forward(x2.data_ptr(), w.data_ptr(), eps, y.data_ptr(), rstd.data_ptr(), rows, groups,
                             width // groups, int(x.dtype == torch.bfloat16), torch.get_num_threads())
        ctx.save_for_backward(x2, weight, rstd)
        ctx.lib = lib
        return y.view(x.shape)

    @staticmethod
    @autocast_off
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        (rows, width), groups, threads = x2.shape, rstd.shape[1], torch.get_num_threads()
        dy2, w = dy.reshape(rows, width).to(x2.dtype).contiguous(), weight.float().contiguous()
        dx = torch.empty_like(x2)
        dw_partial = torch.zeros(threads, width, dtype=torch.float32)
        ctx.lib.rms_norm_backward(dy2.data_ptr(), x2.data_ptr(), w.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
                                  dw_partial.data_ptr(), rows, groups, width // groups,
                                  int(x2.dtype == torch.bfloat16), threads)
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(dy.shape), dw, None, None, None


def cpu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int = 1) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over ``groups`` equal chunks of the last dim (C kernel;
    check :func:`use_cpu_norm` first). fp32 statistics, the result in x's dtype."""
    if x.shape[-1] % groups or weight.shape != (x.shape[-1],):
        raise ValueError(f"cpu_rms_norm: weight {tuple(weight.shape)} must be [{x.shape[-1]}], divisible by {groups}")
    lib = kernel_for(x)
    if lib is None:
        raise RuntimeError(f"cpu_rms_norm: no CPU kernel for a {x.dtype} tensor on {x.device} here (see the log); "
                           "use sdd_train.kernels.rms_norm, which falls back to PyTorch")
    return _CPURMSNorm.apply(x, weight, eps, groups, lib)
