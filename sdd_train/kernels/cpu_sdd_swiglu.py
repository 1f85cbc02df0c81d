"""The SDD feed-forward's SwiGLU on CPU: ``silu(gate) * up`` of ``[up | gate] = alpha * rms(V x)``,
forward and backward each one C kernel (``cpu_kernels.c``), eager and compiled.

Why: compiled, inductor runs this backward as three passes over [tokens, 2 * hidden] tensors that
do not fit in cache (the SwiGLU gradient written out; the norm's row sums with the input gradient;
the gain's column sum reading both again). The kernel does it in one pass per row in fp32 scratch
(x and dh read once, dx written once, per-thread partial gain sums), and the forward keeps ``up`` /
``gate`` in fp32 instead of rounding them to bf16 in between. The tiny ``sdd`` block's forward +
backward runs ~4% faster compiled and ~15% eager (docs/benchmarks.md).

Both directions are custom ops, opaque to torch.compile (no graph break). Where the kernel is not
available (:func:`sdd_train.kernels.cpu_kernels.kernel_for`) they compute the same in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdd_train.kernels.cpu_kernels import kernel_for
from sdd_train.kernels.precision import compute_dtype


# --------------------------------------------------------------------------- PyTorch path


def _normalised(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``up`` and ``gate`` = ``weight * x * rstd`` (rstd per row and group)."""
    rows, groups = rstd.shape
    xf = x.to(rstd.dtype).reshape(rows, groups, -1)
    y = (xf * rstd.unsqueeze(-1)).reshape(rows, -1) * weight.to(rstd.dtype)
    return y.chunk(2, dim=-1)


def _forward_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.to(compute_dtype(x.dtype)).reshape(x.shape[0], groups, -1)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    up, gate = _normalised(x, weight, rstd)
    return (F.silu(gate) * up).to(x.dtype), rstd


def _backward_torch(dh: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, groups = rstd.shape
    up, gate = _normalised(x, weight, rstd)
    dhf, s = dh.to(rstd.dtype), torch.sigmoid(gate)
    dy = torch.cat([dhf * gate * s, dhf * up * s * (1 + gate * (1 - s))], dim=-1)
    w = weight.to(rstd.dtype)
    xf, wdy = x.to(rstd.dtype).reshape(rows, groups, -1), (dy * w).view(rows, groups, -1)
    r = rstd.unsqueeze(-1)
    dx = r * wdy - xf * r.pow(3) * (wdy * xf).mean(-1, keepdim=True)
    dw = (dy * (xf * r).view(rows, -1)).sum(0)
    return dx.view(x.shape).to(x.dtype), dw


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("sdd_train::sdd_swiglu", mutates_args=())
def _sdd_swiglu(x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h [rows, hidden], rstd [rows, groups] in :func:`compute_dtype`) from x [rows, 2 * hidden]."""
    lib = kernel_for(x)
    if lib is None:
        return _forward_torch(x, weight, eps, groups)
    x, w = x.contiguous(), weight.float().contiguous()
    rows, hidden, threads = x.shape[0], x.shape[1] // 2, torch.get_num_threads()
    h = x.new_empty(rows, hidden)
    rstd = torch.empty(rows, groups, dtype=torch.float32)
    lib.sdd_swiglu_forward(x.data_ptr(), w.data_ptr(), eps, h.data_ptr(), rstd.data_ptr(), rows, hidden, groups,
                           int(x.dtype == torch.bfloat16), threads)
    return h, rstd


@_sdd_swiglu.register_fake
def _(x, weight, eps, groups):
    return x.new_empty(x.shape[0], x.shape[1] // 2), x.new_empty(x.shape[0], groups, dtype=compute_dtype(x.dtype))


@torch.library.custom_op("sdd_train::sdd_swiglu_backward", mutates_args=())
def _sdd_swiglu_backward(dh: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx like x, gain gradient [2 * hidden] in rstd's dtype) from dh [rows, hidden]."""
    lib = kernel_for(x)
    if lib is None:
        return _backward_torch(dh, x, weight, rstd)
    dh, x, w, rstd = dh.to(x.dtype).contiguous(), x.contiguous(), weight.float().contiguous(), rstd.contiguous()
    rows, hidden, groups, threads = x.shape[0], x.shape[1] // 2, rstd.shape[1], torch.get_num_threads()
    dx = torch.empty_like(x)
    dw_partial = torch.zeros(threads, 2 * hidden, dtype=torch.float32)
    scratch = torch.empty(threads, 2 * hidden, dtype=torch.float32)
    lib.sdd_swiglu_backward(dh.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
                            dw_partial.data_ptr(), rows, hidden, groups, int(x.dtype == torch.bfloat16),
                            scratch.data_ptr(), threads)
    return dx, dw_partial.sum(0)


@_sdd_swiglu_backward.register_fake
def _(dh, x, weight, rstd):
    return torch.empty_like(x), x.new_empty(x.shape[1], dtype=rstd.dtype)


def _save_for_swiglu_backward(ctx, inputs, output) -> None:
    x, weight, _, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _swiglu_backward(ctx, dh: torch.Tensor, _drstd: torch.Tensor | None):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _sdd_swiglu_backward(dh, x, weight, rstd)
    return dx, dw.to(weight.dtype), None, None


_sdd_swiglu.register_autograd(_swiglu_backward, setup_context=_save_for_swiglu_backward)


def sdd_swiglu(x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int = 1) -> torch.Tensor:
    """``silu(gate) * up`` with ``[up | gate] = weight * rms(x)`` over ``groups`` (1 or 2) equal parts
    of the last dim; the result has x's dtype, the norm and the SwiGLU compute in fp32."""
    width = x.shape[-1]
    if groups not in (1, 2) or width % 2 or weight.shape != (width,):
        raise ValueError(f"sdd_swiglu: need an even width {width}, weight [{width}] and 1 or 2 groups, "
                         f"got weight {tuple(weight.shape)}, groups {groups}")
    h, _ = _sdd_swiglu(x.reshape(-1, width), weight, eps, groups)
    return h.view(*x.shape[:-1], width // 2)
