"""Language-modelling loss: token-mean cross-entropy in fp32, with optional logits z-loss.

``lm_loss`` takes logits. ``linear_cross_entropy`` takes the hidden states and the LM-head weight
and never holds more than ``chunk_size`` rows of logits: it computes the loss and both gradients
chunk by chunk in the forward pass (the backward only scales them), so a 100k vocabulary at long
sequences costs [chunk, V] of logits instead of [tokens, V].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss_weight: float = 0.0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return (total loss, cross-entropy, z-loss or None); z-loss = mean(logsumexp(logits)^2)."""
    logits = logits.float().flatten(0, -2)
    ce = F.cross_entropy(logits, targets.flatten())
    if z_loss_weight <= 0:
        return ce, ce, None
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return ce + z_loss_weight * z, ce, z


class _LinearCrossEntropy(torch.autograd.Function):
    """(hidden [N, d], weight [V, d], targets [N]) -> (ce + w * z, ce, z), gradients precomputed per chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, z_weight: float, chunk_size: int, compute_dtype: torch.dtype):
        n = hidden.shape[0]
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=compute_dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        z_sum = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size].to(compute_dtype)
            t = targets[start:start + chunk_size, None]
            logits = (h @ w.t()).float()
            target_logit = logits.gather(1, t).squeeze(1)
            # softmax and logsumexp from one exp, in place: each op is a pass over [chunk, V] in memory
            row_max = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            lse = (row_max + total.log()).squeeze(1)
            ce_sum += (lse - target_logit).sum()
            z_sum += lse.square().sum()
            # d(ce + w z)/d logits, for the token mean: (softmax * (1 + 2 w lse) - onehot) / n
            grad = probs.mul_(((1.0 + 2.0 * z_weight * lse[:, None]) / n) / total)
            grad.scatter_add_(1, t, grad.new_full(t.shape, -1.0 / n))
            grad = grad.to(compute_dtype)
            grad_hidden[start:start + chunk_size] = grad @ w
            grad_weight += grad.t() @ h  # in the compute dtype, as F.linear's backward under autocast
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ce, z = ce_sum / n, z_sum / n
        ctx.mark_non_differentiable(ce, z)
        return ce + z_weight * z, ce, z

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_z):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((grad_hidden * grad_total).to(hidden_dtype), (grad_weight * grad_total).to(weight_dtype),
                None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         z_loss_weight: float = 0.0, chunk_size: int = 4096
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``lm_loss(hidden @ weight.T, targets, z_loss_weight)`` without materialising all the logits.

    The matmuls run in the autocast dtype when autocast is on (as ``F.linear`` would), the softmax
    in fp32. Only ``total`` carries gradients; ``ce`` and ``z`` are for logging.
    """
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else hidden.dtype
    with torch.autocast(hidden.device.type, enabled=False):
        total, ce, z = _LinearCrossEntropy.apply(hidden.flatten(0, -2), weight, targets.flatten(),
                                                 float(z_loss_weight), int(chunk_size), dtype)
    return total, ce, (z if z_loss_weight > 0 else None)
