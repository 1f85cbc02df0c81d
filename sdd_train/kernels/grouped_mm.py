"""The MoE's expert GEMMs: rows sorted by expert times each expert's weight, as one grouped GEMM
(``torch._grouped_mm``) where it runs, else a loop over experts.

They are custom ops: opaque to torch.compile (their per-expert row counts are data), so a block
with an MoE still compiles as one graph, and the kernel choice stays here.
"""

from __future__ import annotations

import torch


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs on these operands: CUDA sm90+ in bf16, or CPU from torch 2.9
    on (2.8 has the op but no CPU kernel); 16-byte rows."""
    if not hasattr(torch, "_grouped_mm") or any(d % 8 for d in (*a.shape[1:], *b.shape[1:])):
        return False
    if a.is_cuda:
        return a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (9, 0)
    return torch.__version__ >= (2, 9) and a.dtype in (torch.float32, torch.bfloat16)


def expert_mm_loop(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """:func:`expert_mm` as one matmul per expert, in plain (differentiable) PyTorch."""
    pieces = [p @ w[e] for e, p in enumerate(x.split(counts.tolist()))]
    return torch.cat(pieces) if pieces else x.new_zeros(0, w.shape[-1])


@torch.library.custom_op("sdd_train::expert_mm", mutates_args=())
def expert_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, use_grouped: bool) -> torch.Tensor:
    """Rows of ``x`` [N, in], sorted by expert with ``counts`` [E] rows each, times ``w[e]`` [in, out]."""
    if use_grouped and _grouped_mm_ok(x, w):
        return torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))
    return expert_mm_loop(x, w, counts)


@expert_mm.register_fake
def _(x, w, counts, use_grouped):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("sdd_train::expert_mm_wgrad", mutates_args=())
def expert_mm_wgrad(x: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor, use_grouped: bool) -> torch.Tensor:
    """Per expert ``x_e^T @ grad_e``: the [E, in, out] weight gradient of :func:`expert_mm`."""
    if use_grouped and x.is_cuda and _grouped_mm_ok(x, grad):
        return torch._grouped_mm(x.t(), grad, offs=counts.cumsum(0).to(torch.int32))
    sizes = counts.tolist()
    return torch.stack([a.t() @ g for a, g in zip(x.split(sizes), grad.split(sizes))])


@expert_mm_wgrad.register_fake
def _(x, grad, counts, use_grouped):
    return x.new_empty(counts.shape[0], x.shape[1], grad.shape[1])


def _setup(ctx, inputs, output) -> None:
    x, w, counts, use_grouped = inputs
    ctx.save_for_backward(x, w, counts)
    ctx.use_grouped = use_grouped


def _backward(ctx, grad):
    x, w, counts = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = expert_mm(grad, w.transpose(1, 2).contiguous(), counts, ctx.use_grouped)
    grad_w = expert_mm_wgrad(x, grad, counts, ctx.use_grouped)
    return grad_x, grad_w, None, None


expert_mm.register_autograd(_backward, setup_context=_setup)
