"""Muon (``optim.name=muon``): momentum orthogonalised by a Newton-Schulz iteration on the hidden
matrices, AdamW on the embedding, the head, the norm gains and the SDD alphas, in one optimizer.

The update of a matrix W [A, B] with gradient G (Jordan et al. 2024, "Muon"; the form of
``torch.optim.Muon``, which this follows step for step):

    M <- mu M + (1 - mu) G                      (momentum, as a lerp)
    U <- (1 - mu) G + mu M  if nesterov else M
    O <- NS_k(U / ||U||_F)                      (quintic Newton-Schulz, ~ the orthogonal factor of U)
    W <- W (1 - lr wd) - lr s(A, B) O           s: 0.2 sqrt(max(A, B)) (match_rms_adamw) or sqrt(max(1, A/B))

Why not ``torch.optim.Muon`` itself (torch >= 2.9): it orthogonalises whatever tensor it is given, and
under FSDP2 that is a DTensor shard, so each of the iteration's matrix products becomes a collective;
it runs the iteration in bf16 only (PyTorch's reference loop on CPUs without AVX-512 bf16, ~26x
slower than fp32 here); and it refuses the MoE experts' [experts, out, in] stacks. Here a sharded
update is all-gathered once per matrix, orthogonalised whole on every rank (the same input gives
every rank the same result), and each rank keeps its own rows; the iteration runs in
``optim.muon.ns_dtype``, and an expert stack is one batch of matrices. For a 2-D matrix with
ns_dtype=bf16 the update is torch.optim.Muon's to the bit (tests/test_muon.py).

The AdamW groups are updated by ``torch.optim.adamw.adamw`` (fused), with the state layout of
``torch.optim.AdamW``, so the optimizer checkpoints through DCP like AdamW does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim.adamw import adamw

# Jordan's quintic coefficients (and torch.optim.Muon's): a steep slope at zero, singular values
# driven into roughly [0.7, 1.2] in five steps rather than exactly to one.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def orthogonalise(g: Tensor, steps: int, dtype: torch.dtype) -> Tensor:
    """The Newton-Schulz approximation of the orthogonal factor of ``g`` (a matrix, or a stack of them
    in its last two dims), computed in ``dtype`` and returned in it."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    wide = x.size(-2) > x.size(-1)  # iterate on the side whose Gram matrix is the smaller
    if wide:
        x = x.mT
    if x.ndim == 2:
        x = x / x.norm().clamp(min=NS_EPS)
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    else:
        x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if wide else x


def lr_scale(shape: torch.Size, adjust: str) -> float:
    """The factor on the learning rate of a matrix [..., A, B] that sets its update's size."""
    rows, cols = shape[-2], shape[-1]
    if adjust == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def resolve_ns_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where bf16 matrix products are fast (CUDA; CPUs with oneDNN bf16 GEMMs), else fp32."""
    from sdd_train.kernels.precision import DTYPES, slow_bf16_matmuls

    if name != "auto":
        return DTYPES[name]

    return torch.float32 if slow_bf16_matmuls(device) else torch.bfloat16


def _whole(t: Tensor) -> Tensor:
    """The full tensor of a DTensor shard (one all-gather), the tensor itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: Tensor, template: Tensor) -> Tensor:
    """``full`` laid out as ``template``: for a DTensor, this rank's part of it (no communication, every
    rank holds the same ``full``)."""
    if not hasattr(template, "full_tensor"):
        return full
    from torch.distributed.tensor import distribute_tensor

    try:
        return distribute_tensor(full, template.device_mesh, template.placements, src_data_rank=None)
    except TypeError:  # torch < 2.7: no src_data_rank; rank 0's copy is scattered (the same values)
        return distribute_tensor(full, template.device_mesh, template.placements)


class Muon(torch.optim.Optimizer):
    """Muon on the param groups with ``muon=True``, AdamW on the others; one state dict.

    Every group carries AdamW's keys (lr, betas, eps, weight_decay) and Muon's (momentum, nesterov,
    ns_steps, lr_adjust); ``ns_dtype`` is the optimizer's."""

    def __init__(self, groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
                 momentum: float, nesterov: bool, ns_steps: int, lr_adjust: str, ns_dtype: torch.dtype):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0, muon=False, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, lr_adjust=lr_adjust)
        super().__init__(groups, defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params)

    def _muon(self, group: dict, params: list[Tensor]) -> None:
        lr, mu = group["lr"], group["momentum"]
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            ortho = _like(orthogonalise(_whole(update), group["ns_steps"], self.ns_dtype), update)
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(ortho, alpha=-lr * lr_scale(p.shape, group["lr_adjust"]))

    def _adamw(self, group: dict, params: list[Tensor]) -> None:
        for p in params:
            state = self.state[p]
            if "step" not in state:  # torch.optim.AdamW's state, fused layout
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.grad.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
              [s["step"] for s in states], fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
