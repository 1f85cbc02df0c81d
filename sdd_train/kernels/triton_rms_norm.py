"""Fused RMSNorm x gain, forward and backward, as Triton kernels.

One kernel serves every norm of the model: the block norms, QK-norm (per head or over the full
projection) and the SDD norm that follows a projection (``alpha * rms(V x)``), including its
per-branch variant (``groups`` equal chunks normalised separately). Statistics are fp32 whatever
the input dtype; the output has the input's dtype, as in the PyTorch path of
:func:`sdd_train.kernels.norm.rms_norm`.

Why a kernel: eager PyTorch upcasts the bf16 input to fp32, squares, reduces, scales, multiplies
by the gain and casts back, one pass over memory per op (the backward likewise). The kernel reads
the input once and writes the output once, and its backward is one pass too; both keep only the
input in its dtype and one fp32 inverse RMS per row and group. Compiled blocks do not call it:
inductor fuses the PyTorch path itself.

With ``TRITON_INTERPRET=1`` in the environment before triton is imported, the same kernels run on
the CPU through Triton's interpreter (how the tests check them on machines without a GPU).
"""

from __future__ import annotations

import functools

import torch

from sdd_train.kernels.settings import norm_kernel

try:  # optional: pip install triton (GPU builds of PyTorch ship it)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    return triton is not None


def use_fused_norm(x: torch.Tensor) -> bool:
    """True where the Triton kernel runs: CUDA, triton installed, fp32/bf16/fp16, outside torch.compile,
    not forced off (:func:`sdd_train.kernels.settings.norm_kernel`)."""
    return (not torch.compiler.is_compiling() and x.is_cuda and triton is not None and x.dtype in FUSED_DTYPES
            and norm_kernel() != "torch")


def _forward_kernel(X, W, Y, RSTD, stride_x, stride_y, N, eps,
                    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """One row per program; the row is G groups of N features, each normalised on its own."""
    row = tl.program_id(0)
    g = tl.arange(0, BLOCK_G)
    cols = g[:, None] * N + tl.arange(0, BLOCK_N)[None, :]
    mask = (g[:, None] < G) & (tl.arange(0, BLOCK_N)[None, :] < N)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    tl.store(Y + row * stride_y + cols, (x * rstd[:, None] * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row * G + g, rstd, mask=g < G)


def _backward_kernel(DY, X, W, RSTD, DX, DW, stride_dy, stride_x, stride_dx, n_rows, rows_per_program, N,
                     G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """Each program takes a contiguous range of rows: dx per row, and its partial sum of dy * x_hat
    for the gain (reduced over programs afterwards, so no atomics and a deterministic result)."""
    pid = tl.program_id(0)
    g = tl.arange(0, BLOCK_G)
    cols = g[:, None] * N + tl.arange(0, BLOCK_N)[None, :]
    mask = (g[:, None] < G) & (tl.arange(0, BLOCK_N)[None, :] < N)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    for row in range(start, end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row * G + g, mask=g < G, other=0.0)
        x_hat = x * rstd[:, None]
        wdy = w * dy
        c = tl.sum(x_hat * wdy, axis=1) / N
        dx = (wdy - x_hat * c[:, None]) * rstd[:, None]
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW + pid * G * N + cols, dw, mask=mask)


@functools.cache
def _kernels():
    """The jitted kernels, built on first use (so importing this module never needs triton)."""
    return triton.jit(_forward_kernel), triton.jit(_backward_kernel)


def _launch_shape(n: int, groups: int) -> tuple[int, int, int]:
    block_n = triton.next_power_of_2(n)
    block_g = triton.next_power_of_2(groups)
    num_warps = min(max(block_g * block_n // 512, 1), 16)
    return block_g, block_n, num_warps


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as [rows, width] with unit feature stride (a view where possible)."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _programs(device: torch.device, n_rows: int) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(n_rows, 4 * sms))


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int) -> torch.Tensor:
        width = x.shape[-1]
        n = width // groups
        x2 = _rows(x, width)
        y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty(x2.shape[0], groups, dtype=torch.float32, device=x.device)
        block_g, block_n, num_warps = _launch_shape(n, groups)
        forward_kernel, _ = _kernels()
        forward_kernel[(x2.shape[0],)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n, eps,
                                       G=groups, BLOCK_G=block_g, BLOCK_N=block_n, num_warps=num_warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.groups, ctx.shape = groups, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        groups, width = ctx.groups, x2.shape[-1]
        n, n_rows = width // groups, x2.shape[0]
        dy2 = _rows(dy, width)
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        programs = _programs(x2.device, n_rows)
        rows_per_program = -(-n_rows // programs)
        programs = -(-n_rows // rows_per_program)
        dw_partial = torch.empty(programs, width, dtype=torch.float32, device=x2.device)
        block_g, block_n, num_warps = _launch_shape(n, groups)
        _, backward_kernel = _kernels()
        backward_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0),
                                     n_rows, rows_per_program, n, G=groups, BLOCK_G=block_g, BLOCK_N=block_n,
                                     num_warps=num_warps)
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None, None


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int = 1) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over ``groups`` equal chunks of the last dim (Triton)."""
    if triton is None:
        raise RuntimeError("fused_rms_norm needs the triton package (pip install triton)")
    if x.shape[-1] % groups or weight.shape != (x.shape[-1],):
        raise ValueError(f"fused_rms_norm: weight {tuple(weight.shape)} must be [{x.shape[-1]}], divisible by {groups}")
    return _FusedRMSNorm.apply(x, weight.contiguous(), eps, groups)
