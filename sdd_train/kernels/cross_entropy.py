"""Language-modelling loss: token-mean cross-entropy in fp32, with optional logits z-loss.

A target of ``IGNORE`` (-100, what the repetition instance filter writes) adds nothing to either
term nor to the gradient, and the mean still divides by every token, as OLMo's loss does (the sum
over the batch's tokens divided by their number).

``lm_loss`` takes logits. ``linear_cross_entropy`` takes the hidden states and the LM-head weight
and never holds more than ``chunk_size`` rows of logits: it computes the loss and both gradients
chunk by chunk in the forward pass (the backward only scales them), so a 100k vocabulary at long
sequences costs [chunk, V] of logits instead of [tokens, V].
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sdd_train.kernels.settings import cpu_values


IGNORE = -100


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss_weight: float = 0.0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return (total loss, cross-entropy, z-loss or None); z-loss = mean(logsumexp(logits)^2)."""
    logits, targets = logits.float().flatten(0, -2), targets.flatten()
    n = targets.numel()
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum") / n
    if z_loss_weight <= 0:
        return ce, ce, None
    z = torch.logsumexp(logits, dim=-1).pow(2).masked_fill(targets == IGNORE, 0.0).sum() / n
    return ce + z_loss_weight * z, ce, z


# On CPU the softmax rows are processed in blocks of about this many logits (4 MiB in fp32), so the
# eight elementwise passes over a block hit cache instead of memory: for 4,096 tokens x vocabulary
# 8,192 on the 2-core dev machine ~20 ms instead of ~46 ms as one block; with the head's matmuls
# 97 ms vs the plain path's 110 ms (benchmarks/cpu_ops.py). GPUs take the chunk as one block.
_CPU_BLOCK_ELEMENTS = 1 << 20


def _cross_entropy_grad_(logits: torch.Tensor, targets: torch.Tensor, z_weight: float, n: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (sum of cross-entropies, sum of logsumexp^2) over the rows of ``logits`` [R, V] and
    overwrite ``logits`` with d(ce + w z)/d logits for the mean over ``n`` tokens.

    The softmax runs in fp32 whatever the logits' dtype; the gradient is rounded to it once, as the
    plain autocast path rounds its fp32 gradient for the head matmul.
    """
    rows, vocab = logits.shape
    step = max(_CPU_BLOCK_ELEMENTS // vocab, 1) if cpu_values(logits) else rows
    ce_sum = logits.new_zeros((), dtype=torch.float32)
    z_sum = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, rows, step):
        block = logits[start:start + step]
        t = targets[start:start + step, None]
        kept = (t != IGNORE).float()  # 1, or 0 for an ignored target: multiplies exactly
        t = t.clamp(min=0)
        x = block.float()  # fp32 logits: the block itself, updated in place
        target_logit = x.gather(1, t)
        row_max = x.amax(dim=-1, keepdim=True)
        probs = x.sub_(row_max).exp_()  # softmax and logsumexp from one exp
        total = probs.sum(dim=-1, keepdim=True)
        lse = row_max + total.log()
        ce_sum += ((lse - target_logit) * kept).sum()
        z_sum += (lse.square() * kept).sum()
        # (softmax * (1 + 2 w lse) - onehot) / n, zero on an ignored row
        probs.mul_(kept * (((1.0 + 2.0 * z_weight * lse) / n) / total))
        probs.scatter_add_(1, t, kept * (-1.0 / n))
        if probs is not block:
            block.copy_(probs)
    return ce_sum, z_sum


def _cross_entropy_grad_fusible_(logits: torch.Tensor, targets: torch.Tensor, z_weight: float, n: int
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_cross_entropy_grad_` written for ``torch.compile``: every step out of place up to the
    final ``copy_``, the target's ``-1/n`` by ``where`` instead of a scatter, so inductor emits one
    kernel that passes over each row three times while it is in cache (max, sum of exp, gradient).
    On the 2-core dev machine 4,096 x 8,192 logits take ~16 ms instead of eager's ~28 ms
    (docs/benchmarks.md); run eagerly, this form is the slow one.
    """
    x = logits.float()  # fp32 logits: ``logits`` itself, so read all of x before the copy_
    kept = (targets[:, None] != IGNORE).float()
    t = targets[:, None].clamp(min=0)
    target_logit = x.gather(1, t)
    row_max = x.amax(dim=-1, keepdim=True)
    probs = (x - row_max).exp()
    total = probs.sum(dim=-1, keepdim=True)
    lse = row_max + total.log()
    grad = probs * (kept * (((1.0 + 2.0 * z_weight * lse) / n) / total))
    is_target = torch.arange(x.shape[-1], device=x.device) == t
    logits.copy_(torch.where(is_target, grad - kept * (1.0 / n), grad))
    return ((lse - target_logit) * kept).sum(), (lse.square() * kept).sum()


@functools.cache
def _compiled_cross_entropy_grad():
    """One compiled kernel per process, with dynamo's automatic dynamic shapes: the first call is
    compiled with static sizes, and each size that changes later (the chunk's rows, the token count)
    turns symbolic at its first change, so a run compiles it at most three times."""
    return torch.compile(_cross_entropy_grad_fusible_, fullgraph=True)


class _LinearCrossEntropy(torch.autograd.Function):
    """(hidden [N, d], weight [V, d], targets [N]) -> (ce + w * z, ce, z), gradients precomputed per chunk
    (only those asked for: without grad mode, e.g. in evaluation, the loss costs one matmul, not three)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, z_weight: float, chunk_size: int, compute_dtype: torch.dtype,
                want_hidden: bool, want_weight: bool, compiled: bool):
        n = hidden.shape[0]
        cross_entropy_grad_ = _compiled_cross_entropy_grad() if compiled else _cross_entropy_grad_
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=compute_dtype, device=hidden.device) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        z_sum = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size].to(compute_dtype)
            grad = h @ w.t()  # the logits, overwritten with their gradient
            ce, z = cross_entropy_grad_(grad, targets[start:start + chunk_size], z_weight, n)
            ce_sum += ce
            z_sum += z
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = grad @ w
            if grad_weight is not None:
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
        return ((grad_hidden * grad_total).to(hidden_dtype) if grad_hidden is not None else None,
                (grad_weight * grad_total).to(weight_dtype) if grad_weight is not None else None,
                None, None, None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         z_loss_weight: float = 0.0, chunk_size: int = 4096, compiled: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``lm_loss(hidden @ weight.T, targets, z_loss_weight)`` without materialising all the logits.

    The matmuls run in the autocast dtype when autocast is on (as ``F.linear`` would), the softmax
    in fp32. Only ``total`` carries gradients; ``ce`` and ``z`` are for logging. ``compiled`` runs
    the softmax and its gradient through ``torch.compile`` (needs what compiling the blocks needs).
    """
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else hidden.dtype
    grad_mode = torch.is_grad_enabled()
    with torch.autocast(hidden.device.type, enabled=False):
        total, ce, z = _LinearCrossEntropy.apply(hidden.flatten(0, -2), weight, targets.flatten(),
                                                 float(z_loss_weight), int(chunk_size), dtype,
                                                 grad_mode and hidden.requires_grad, grad_mode and weight.requires_grad,
                                                 compiled)
    return total, ce, (z if z_loss_weight > 0 else None)
