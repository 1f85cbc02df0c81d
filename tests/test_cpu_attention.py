"""The batched-matmul causal attention used on CPU for short sequences (sdd_train.kernels.cpu_attention)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import small_model_cfg
from sdd_train.kernels import cpu_attention
from sdd_train.kernels import attention
from sdd_train.model import Transformer

ROOT = Path(__file__).resolve().parents[1]


def sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Causal (or ``mask``ed) attention in float64 through SDPA's math, k/v heads repeated for GQA."""
    rep = q.shape[2] // k.shape[2]
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    causal = {"is_causal": True} if mask is None else {"attn_mask": mask}
    return F.scaled_dot_product_attention(q, k, v, **causal).transpose(1, 2)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("span", [64, 8])
@pytest.mark.parametrize("documents", [False, True])
def test_matches_float64_attention_and_gradients(monkeypatch, dtype, heads, kv_heads, span, documents):
    """Output and q/k/v gradients against float64, in one span or five (the last one ragged); k and
    v as strided slices of a fused projection (as the model passes them); causal, or within documents
    that cross span boundaries. bf16: within the error of one bf16 rounding per product (SDPA's own
    bf16 kernel is ~2e-3 here)."""
    monkeypatch.setattr(cpu_attention, "SPAN", span)
    torch.manual_seed(0)
    b, s, d = 3, 37, 16
    q = (torch.randn(b, s, heads, d) * 2).to(dtype).requires_grad_()
    kv = torch.randn(b, s, 2 * kv_heads * d).to(dtype).requires_grad_()
    k, v = (t.unflatten(-1, (kv_heads, d)) for t in kv.split(kv_heads * d, dim=-1))
    dout = torch.randn(b, s, heads, d).to(dtype)
    mask = None
    if documents:  # rows of 3, 2 and 1 documents, boundaries inside spans
        doc_ids = torch.tensor([[0] * 11 + [1] * 26, [2] * 20 + [3] * 17, [4] * 37])
        mask = attention.document_mask(doc_ids)
    out = cpu_attention.cpu_causal_attention(q, k, v, mask)
    dq, dkv = torch.autograd.grad(out, (q, kv), dout)
    q64, kv64 = q.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
    k64, v64 = (t.unflatten(-1, (kv_heads, d)) for t in kv64.split(kv_heads * d, dim=-1))
    ref = sdpa_reference(q64, k64, v64, mask)
    dq64, dkv64 = torch.autograd.grad(ref, (q64, kv64), dout.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    for name, got, want in (("out", out, ref), ("dq", dq, dq64), ("dkv", dkv, dkv64)):
        assert relative_error(got, want) < tol, name


def test_autocast_does_not_lower_the_score_precision():
    """The model calls it under bf16 autocast: the result must be the one computed with fp32 scores
    (autocast would run the score product in bf16; at this scale that doubled the error)."""
    torch.manual_seed(0)
    q = (torch.randn(2, 40, 4, 16) * 3).bfloat16().requires_grad_()
    k = (torch.randn(2, 40, 2, 16) * 3).bfloat16().requires_grad_()
    v = torch.randn(2, 40, 2, 16).bfloat16().requires_grad_()
    dout = torch.randn(2, 40, 4, 16).bfloat16()
    out = cpu_attention.cpu_causal_attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    with torch.autocast("cpu", torch.bfloat16):
        out_ac = cpu_attention.cpu_causal_attention(q, k, v)
    grads_ac = torch.autograd.grad(out_ac, (q, k, v), dout)
    assert torch.equal(out_ac, out)
    for g_ac, g in zip(grads_ac, grads):
        assert torch.equal(g_ac, g)


def test_compiled_under_autocast_keeps_fp32_scores():
    """Inside the compiled blocks too (dynamo traces the autograd function, autocast-off included). On
    aot_eager: a region traced under autocast would compute bf16 scores there and differ from eager."""
    torch.manual_seed(0)
    q = (torch.randn(2, 40, 4, 16) * 3).bfloat16()
    k = (torch.randn(2, 40, 2, 16) * 3).bfloat16()
    v = torch.randn(2, 40, 2, 16).bfloat16()
    compiled = torch.compile(cpu_attention.cpu_causal_attention, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", torch.bfloat16):
        out = compiled(q, k, v)
    assert torch.equal(out, cpu_attention.cpu_causal_attention(q, k, v))


def test_auto_backend_dispatch_on_cpu(monkeypatch):
    """'auto' on CPU takes it for sequences within MAX_SCORES, unmasked or with a document mask; 'sdpa'
    or more scores than MAX_SCORES go to SDPA, with the same result."""
    calls = []
    real = attention.cpu_causal_attention
    monkeypatch.setattr(attention, "cpu_causal_attention", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    auto = attention.causal_attention(q, k, v, "auto")
    assert calls == [1]
    sdpa = attention.causal_attention(q, k, v, "sdpa")
    masked = attention.causal_attention(q, k, v, "auto", attention.document_mask(torch.zeros(2, 9, dtype=torch.long)))
    assert calls == [1, 1]
    monkeypatch.setattr(cpu_attention, "MAX_SCORES", 2 * 4 * 9 * 9 - 1)
    long = attention.causal_attention(q, k, v, "auto")
    assert calls == [1, 1]
    for other in (sdpa, masked, long):
        torch.testing.assert_close(auto, other, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", ["sdd", "pre"])
def test_model_with_cpu_attention_equals_sdpa(block):
    torch.manual_seed(0)
    cfg = small_model_cfg(block)
    auto, sdpa = Transformer(cfg), Transformer(dataclasses.replace(cfg, attention_backend="sdpa"))
    sdpa.load_state_dict(auto.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = auto(tokens)
    logits.square().mean().backward()
    ref = sdpa(tokens)
    ref.square().mean().backward()
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    for (name, p), p_ref in zip(auto.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6 * p_ref.grad.abs().max().item(), msg=name)


def test_cpu_ops_benchmark_smoke(tmp_path):
    """benchmarks/cpu_ops.py runs end to end (tiny shapes; its numbers mean nothing here)."""
    spec = importlib.util.spec_from_file_location("bench_cpu_ops", ROOT / "benchmarks" / "cpu_ops.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--reps", "1", "--json", str(tmp_path / "ops.json")]) == 0
    rows = json.loads((tmp_path / "ops.json").read_text())["rows"]
    assert len(rows) == 19 and all(r["median_ms"] > 0 for r in rows)
