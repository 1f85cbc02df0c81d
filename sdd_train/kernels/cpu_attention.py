"""Causal GQA attention for short sequences on CPU, as a few batched matmuls.

PyTorch's SDPA on CPU runs a flash-style kernel: it tiles the sequence and recomputes the scores in
the backward, which saves memory at long sequences but leaves the small matmuls of a short one
underused. At the tiny config's shape (16 x 256 tokens, 4 query and 2 kv heads of 64) its forward
+ backward takes ~27 ms per layer on the 2-core dev machine; this takes ~14 ms (docs/benchmarks.md).
It materialises the scores instead, span by span of :data:`SPAN` query positions: a span attends
only to the keys up to its end, so the masked upper triangle is mostly never computed (the work
of 4 spans of 256 positions is 5/8 of the full square). Per span one ``baddbmm`` scales ``q k^T``
and adds the causal mask (or a document mask, which holds it), one softmax, one product with ``v``; the backward reuses the saved
probabilities. GQA is free: the G query heads that share a kv head are rows of the same matmul.

Precision: scores, softmax and the score gradient in fp32 (like SDPA's kernel), also under bf16
autocast (turned off inside); the products with ``v``, and the ``q``/``k`` gradient products, in
the input dtype with fp32 accumulation. The fp32 products multiply bf16 values (upcast q, k, v,
dO), so the trainer can run them in oneDNN's bf16 fpmath mode exactly
(:func:`sdd_train.kernels.precision.bf16_products_of_bf16_values`; at this shape oneDNN computes
them ~2.2x faster than MKL, where fp32 matmuls go otherwise). Memory: the probabilities are kept
for the backward (6 bytes per score in bf16), so it is used only up to :data:`MAX_SCORES` scores
per layer; longer inputs go to SDPA.
"""

from __future__ import annotations

import torch

from sdd_train.kernels.precision import autocast_off, compute_dtype
from sdd_train.kernels.settings import cpu_values

# Scores (batch x query heads x S x S) per call up to which the scores are materialised:
# 2^24 = ~100 MB kept per layer for the backward in bf16 (the tiny config: 2^22).
MAX_SCORES = 1 << 24
# Query positions per span (64 and 32 measured alike at S=256, 128 ~7% slower, one span ~25%).
SPAN = 64


def cpu_attention_usable(q: torch.Tensor, k: torch.Tensor) -> bool:
    """CPU tensors of a short enough sequence (self-attention: as many keys as queries)."""
    b, s, h, _ = q.shape
    return cpu_values(q) and k.shape[1] == s and b * h * s * s <= MAX_SCORES


def cpu_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """Causal attention of [B, S, H, D] queries over [B, S, Hkv, D] keys and values -> [B, S, H, D].

    ``mask``: a [B, 1, S, S] boolean mask that already holds the causal one (a document mask); every
    query must see at least itself."""
    return _CPUAttention.apply(q, k, v, SPAN, mask)


def _score_bias(mask: torch.Tensor | None, s: int, g: int, kv_heads: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """What is added to the scores: 0 where a query may attend, -inf elsewhere, as [1 or B * Hkv, S * G, S]
    (row s * G + g is query head g of position s, as :func:`_stack_groups` lays them out)."""
    if mask is None:
        return torch.full((s, s), float("-inf"), dtype=dtype, device=device).triu_(1).repeat_interleave(g, dim=0)[None]
    bias = torch.zeros(mask.shape[0], s, s, dtype=dtype, device=device).masked_fill_(~mask[:, 0], float("-inf"))
    return bias.repeat_interleave(g, dim=1).repeat_interleave(kv_heads, dim=0)


def _stack_groups(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, S, H, D] -> [B * Hkv, S * G, D]: row s * G + g is query head g of the kv head at position s,
    so the rows of a span of positions are contiguous."""
    b, s, h, d = t.shape
    return t.view(b, s, kv_heads, h // kv_heads, d).transpose(1, 2).reshape(b * kv_heads, s * (h // kv_heads), d)


def _unstack_groups(t: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """Inverse of :func:`_stack_groups`."""
    bk, sg, d = t.shape
    kv_heads = bk // batch
    g = heads // kv_heads
    return t.view(batch, kv_heads, sg // g, g, d).transpose(1, 2).reshape(batch, sg // g, heads, d)


def _kv_layout(t: torch.Tensor) -> torch.Tensor:
    """[B, S, Hkv, D] -> [B * Hkv, S, D]."""
    b, s, hk, d = t.shape
    return t.transpose(1, 2).reshape(b * hk, s, d)


def _from_kv_layout(t: torch.Tensor, batch: int) -> torch.Tensor:
    bk, s, d = t.shape
    return t.view(batch, bk // batch, s, d).transpose(1, 2)


def _spans(s: int, span: int) -> list[tuple[int, int]]:
    return [(a, min(a + span, s)) for a in range(0, s, span)]


class _CPUAttention(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: int, mask: torch.Tensor | None
                ) -> torch.Tensor:
        b, s, h, d = q.shape
        kv_heads = k.shape[2]
        g = h // kv_heads
        acc = compute_dtype(q.dtype)
        qs, ks, vs = _stack_groups(q, kv_heads), _kv_layout(k), _kv_layout(v)
        qa, ka = qs.to(acc), ks.to(acc)
        bias = _score_bias(mask, s, g, kv_heads, acc, q.device)
        saved, outs = [], []
        for a, e in _spans(s, span):
            rows = slice(a * g, e * g)
            scores = torch.baddbmm(bias[:, rows, :e], qa[:, rows], ka[:, :e].transpose(1, 2), alpha=d**-0.5)
            probs = torch.softmax(scores, dim=-1)
            probs_low = probs.to(q.dtype)
            outs.append(torch.bmm(probs_low, vs[:, :e]))
            saved += [probs, probs_low]
        out = torch.cat(outs, dim=1)
        ctx.save_for_backward(qs, ks, vs, out, *saved)
        ctx.heads, ctx.span = h, span
        return _unstack_groups(out, b, h)

    @staticmethod
    @autocast_off
    def backward(ctx, dout: torch.Tensor):
        qs, ks, vs, out, *saved = ctx.saved_tensors
        b = dout.shape[0]
        s = ks.shape[1]
        g = qs.shape[1] // s
        scale = qs.shape[-1] ** -0.5
        acc = saved[0].dtype
        do = _stack_groups(dout.to(qs.dtype), ks.shape[0] // b)
        # softmax backward: dscores = P * (dP - rowsum(dO * O))
        delta = torch.linalg.vecdot(do.to(acc), out.to(acc)).unsqueeze_(-1)
        va = vs.to(acc)
        spans = _spans(s, ctx.span)
        dq, dk, dv = [], [], []  # per span: its query rows of dq; dk, dv over its key prefix
        for (a, e), probs, probs_low in zip(spans, saved[0::2], saved[1::2]):
            rows = slice(a * g, e * g)
            dv.append(torch.bmm(probs_low.transpose(1, 2), do[:, rows]))  # sums the G heads of a kv head
            dprobs = torch.bmm(do[:, rows].to(acc), va[:, :e].transpose(1, 2))
            dscores = dprobs.sub_(delta[:, rows]).mul_(probs).to(qs.dtype)
            dq.append(torch.bmm(dscores, ks[:, :e]).mul_(scale))
            dk.append(torch.bmm(dscores.transpose(1, 2), qs[:, rows]))
        dk = _sum_over_spans(dk, spans, acc).mul_(scale).to(ks.dtype)
        dv = _sum_over_spans(dv, spans, acc).to(vs.dtype)
        return (_unstack_groups(torch.cat(dq, dim=1), b, ctx.heads), _from_kv_layout(dk, b), _from_kv_layout(dv, b),
                None, None)


def _sum_over_spans(parts: list[torch.Tensor], spans: list[tuple[int, int]], dtype: torch.dtype) -> torch.Tensor:
    """Sum per-span key gradients, ``parts[i]`` covering the keys up to span i's end, in ``dtype``.

    Key block j gets parts j, j+1, ... (in that order), and the blocks are concatenated. Adding each
    part into a prefix slice in place computes the same sums, but inductor turns that chain of
    prefix updates into one kernel of nested selects that re-reads the parts for every level
    (~3 ms per layer's backward on the 2-core dev machine for 0.5 M key-gradient values).
    """
    blocks = []
    for j, (a, e) in enumerate(spans):
        total = parts[j][:, a:e].to(dtype)
        for part in parts[j + 1:]:
            total = total + part[:, a:e]
        blocks.append(total)
    return torch.cat(blocks, dim=1)
