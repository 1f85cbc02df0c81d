"""The MoE's expert GEMMs: rows sorted by expert times each expert's weight, as one grouped GEMM
(``torch._grouped_mm``) where it runs, else a loop over experts.

They are custom ops: opaque to torch.compile (their per-expert row counts are data), so a block
with an MoE still compiles as one graph, and the kernel choice stays here.

Weights are taken as views (an expert's ``[out, in]`` matrix transposed, never copied), and the
loop reads its row counts from a host copy made once per layer (:func:`expert_counts`), so a layer
costs at most one device-to-host sync, in its forward, whatever the kernel.
"""

from __future__ import annotations

import torch

# torch._grouped_mm runs on every CUDA device from torch 2.9 (sm90+ in bf16: CUTLASS grouped GEMM;
# elsewhere torch's own per-group fallback), and on CPU from 2.9 (2.8 has the op but no CPU kernel).
_GROUPED_MM_MIN_TORCH = (2, 9)


def grouped_mm_runs(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """Whether ``torch._grouped_mm`` runs on operands of this device, dtype and feature sizes: torch >= 2.9
    (or CUDA sm90+ in bf16 on the 2.8 that introduced it), fp32 or bf16, 16-byte rows."""
    if not hasattr(torch, "_grouped_mm") or any(d % 8 for d in dims) or dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.__version__ >= _GROUPED_MM_MIN_TORCH:
        return True
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)


def expert_counts(counts: torch.Tensor, dtype: torch.dtype, dims: tuple[int, ...], use_grouped: bool) -> torch.Tensor:
    """The row counts as a layer's expert GEMMs (in ``dtype``, feature sizes ``dims``) will read them: on
    the device for the grouped GEMM, else on the host (one copy, a sync on a GPU, that the layer's
    forward and backward loops share)."""
    return counts if use_grouped and grouped_mm_runs(counts.device, dtype, dims) else counts.cpu()


def _offsets(counts: torch.Tensor, device: torch.device) -> torch.Tensor:
    return counts.to(device).cumsum(0).to(torch.int32)


def expert_mm_loop(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """:func:`expert_mm` as one matmul per expert, in plain (differentiable) PyTorch."""
    pieces = [p @ w[e] for e, p in enumerate(x.split(counts.tolist()))]
    return torch.cat(pieces) if pieces else x.new_zeros(0, w.shape[-1])


def _use_grouped(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, use_grouped: bool) -> bool:
    """Grouped where asked and it runs, and where :func:`expert_counts` left the counts on the device."""
    return (use_grouped and counts.device == x.device
            and grouped_mm_runs(x.device, x.dtype, (*x.shape[1:], *w.shape[1:])))


@torch.library.custom_op("sdd_train::expert_mm", mutates_args=())
def expert_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, use_grouped: bool) -> torch.Tensor:
    """Rows of ``x`` [N, in], sorted by expert with ``counts`` [E] rows each, times ``w[e]`` [in, out]
    (any strides: a transposed view of [E, out, in] weights is taken as it is)."""
    if _use_grouped(x, w, counts, use_grouped):
        return torch._grouped_mm(x, w, offs=_offsets(counts, x.device))
    return expert_mm_loop(x, w, counts)


@expert_mm.register_fake
def _(x, w, counts, use_grouped):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("sdd_train::expert_mm_wgrad", mutates_args=())
def expert_mm_wgrad(x: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor, use_grouped: bool) -> torch.Tensor:
    """Per expert ``x_e^T @ grad_e``: the [E, in, out] weight gradient of :func:`expert_mm`."""
    if _use_grouped(x, grad, counts, use_grouped):
        return torch._grouped_mm(x.t(), grad, offs=_offsets(counts, x.device))
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
    grad_x = expert_mm(grad, w.transpose(1, 2), counts, ctx.use_grouped)
    grad_w = expert_mm_wgrad(x, grad, counts, ctx.use_grouped)
    return grad_x, grad_w, None, None


expert_mm.register_autograd(_backward, setup_context=_setup)
