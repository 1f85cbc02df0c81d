"""Causal GQA attention for short sequences on CPU, as a few batched matmuls.

PyTorch's SDPA on CPU runs a flash-style kernel: it tiles the sequence and recomputes the scores in
the backward, which saves memory at long sequences but leaves the small matmuls of a short one
underused. At the tiny config's shape (16 x 256 tokens, 4 query and 2 kv heads of 64) its forward
+ backward takes ~33 ms per layer on the 2-core dev machine; this takes ~22 ms, a third of a
compiled training step (docs/benchmarks.md). It materialises the [G*S, S] scores per kv head
instead: one ``baddbmm`` adds the causal mask while scaling ``q k^T``, one softmax, and the backward
reuses the saved probabilities. GQA is free: the G query heads that share a kv head are stacked
along the rows of one matmul.

Precision: scores, softmax and the score gradient in fp32 (like SDPA's kernel); the products with
``v``, and the ``q``/``k`` gradient products, in the input dtype with fp32 accumulation. Memory:
the probabilities are kept for the backward (6 bytes per score in bf16), so it is used only up to
:data:`MAX_SCORES` scores per layer; longer inputs go to SDPA.
"""

from __future__ import annotations

import torch

# Scores (batch x query heads x S x S) per call up to which the scores are materialised:
# 2^24 = ~100 MB kept per layer for the backward in bf16 (the tiny config: 2^22).
MAX_SCORES = 1 << 24


def cpu_attention_usable(q: torch.Tensor, k: torch.Tensor) -> bool:
    """CPU tensors of a short enough sequence (self-attention: as many keys as queries)."""
    b, s, h, _ = q.shape
    return q.device.type == "cpu" and k.shape[1] == s and b * h * s * s <= MAX_SCORES


def cpu_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of [B, S, H, D] queries over [B, S, Hkv, D] keys and values -> [B, S, H, D]."""
    return _CPUAttention.apply(q, k, v)


def _stack_groups(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, S, H, D] -> [B * Hkv, G * S, D]: the G query heads of a kv head stacked along the rows."""
    b, s, h, d = t.shape
    g = h // kv_heads
    return t.view(b, s, kv_heads, g, d).permute(0, 2, 3, 1, 4).reshape(b * kv_heads, g * s, d)


def _unstack_groups(t: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """Inverse of :func:`_stack_groups`."""
    bk, gs, d = t.shape
    kv_heads = bk // batch
    g = heads // kv_heads
    return t.view(batch, kv_heads, g, gs // g, d).permute(0, 3, 1, 2, 4).reshape(batch, gs // g, heads, d)


def _kv_layout(t: torch.Tensor) -> torch.Tensor:
    """[B, S, Hkv, D] -> [B * Hkv, S, D]."""
    b, s, hk, d = t.shape
    return t.transpose(1, 2).reshape(b * hk, s, d)


def _from_kv_layout(t: torch.Tensor, batch: int) -> torch.Tensor:
    bk, s, d = t.shape
    return t.view(batch, bk // batch, s, d).transpose(1, 2)


class _CPUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, s, h, d = q.shape
        kv_heads = k.shape[2]
        acc = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
        qs, ks, vs = _stack_groups(q, kv_heads), _kv_layout(k), _kv_layout(v)
        # 0 on and below the diagonal, -inf above, for each of the G stacked heads
        mask = torch.full((s, s), float("-inf"), dtype=acc, device=q.device).triu_(1).repeat(h // kv_heads, 1)
        scores = torch.baddbmm(mask, qs.to(acc), ks.to(acc).transpose(1, 2), alpha=d**-0.5)
        probs = torch.softmax(scores, dim=-1)
        probs_low = probs.to(q.dtype)
        out = torch.bmm(probs_low, vs)
        ctx.save_for_backward(qs, ks, vs, probs, probs_low, out)
        ctx.heads = h
        return _unstack_groups(out, b, h)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        qs, ks, vs, probs, probs_low, out = ctx.saved_tensors
        b = dout.shape[0]
        scale = qs.shape[-1] ** -0.5
        acc = probs.dtype
        do = _stack_groups(dout.to(qs.dtype), ks.shape[0] // b)
        dv = torch.bmm(probs_low.transpose(1, 2), do)  # sums the G stacked heads of each kv head
        dprobs = torch.bmm(do.to(acc), vs.to(acc).transpose(1, 2))
        # softmax backward: dscores = P * (dP - rowsum(dO * O))
        delta = torch.linalg.vecdot(do.to(acc), out.to(acc)).unsqueeze_(-1)
        dscores = dprobs.sub_(delta).mul_(probs).to(qs.dtype)
        dq = torch.bmm(dscores, ks).mul_(scale)
        dk = torch.bmm(dscores.transpose(1, 2), qs).mul_(scale)
        return _unstack_groups(dq, b, ctx.heads), _from_kv_layout(dk, b), _from_kv_layout(dv, b)
