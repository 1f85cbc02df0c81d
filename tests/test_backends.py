"""torch.compile of a block (full graph, no breaks) and attention backends."""

import dataclasses

import pytest
import torch

from conftest import small_model_cfg, small_run
from sdd_train.model import Transformer
from sdd_train.kernels import attention
from sdd_train.distributed.parallelize import apply_compile


@pytest.mark.parametrize("backend,shapes", [("inductor", [(2, 16)]), ("aot_eager", [(2, 16), (3, 8)])])
def test_compiled_blocks_match_eager_and_follow_shape_changes(backend, shapes):
    """Compiled blocks (full graph: a graph break is an error) give eager's outputs and gradients, and
    a new batch size and sequence length (a short validation batch) get their own static graph and still
    do. The SDD block has the CPU attention's span loop, the norm's row blocks and the SDD layers;
    ``pre`` blocks compile in tests/test_matrix.py's compiled combinations. Inductor's kernels at one
    shape (each further static shape builds its own: a minute of C++ on a cold cache); the shape change
    is dynamo's, checked with the aot_eager backend."""
    torch.manual_seed(0)
    model = Transformer(small_model_cfg("sdd"))
    compiled = Transformer(small_model_cfg("sdd"))
    compiled.load_state_dict(model.state_dict())
    apply_compile(compiled.parallel_plan(), backend=backend)
    assert set(compiled.state_dict()) == set(model.state_dict())  # parameter names unchanged
    for shape in shapes:
        tokens = torch.randint(0, 97, shape)
        want = model(tokens)
        want.square().mean().backward()
        got = compiled(tokens)
        got.square().mean().backward()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(), msg=name)


def test_sdpa_fallback_without_gqa_support(monkeypatch):
    """Older torch (no enable_gqa) repeats k/v heads; both paths agree."""
    q = torch.randn(2, 9, 4, 8)
    k, v = torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    native = attention.causal_attention(q, k, v, "sdpa")
    monkeypatch.setattr(attention, "SDPA_HAS_GQA", False)
    torch.testing.assert_close(attention.causal_attention(q, k, v, "sdpa"), native)


def test_flash_backend_without_flash_attn_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_func", None)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="flash-attn"):
        attention.causal_attention(q, q, q, "flash")
    torch.testing.assert_close(attention.causal_attention(q, q, q, "auto"), attention.causal_attention(q, q, q, "sdpa"))


def _reference_flash_attn_func(q, k, v, causal):
    """flash-attn's ``flash_attn_func`` by its documented contract ([B, S, H, D], fewer k/v heads
    allowed), in plain PyTorch: stands in for the CUDA library, which cannot be installed here."""
    assert causal and q.shape[2] % k.shape[2] == 0
    rep = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2), v.repeat_interleave(rep, 2).transpose(1, 2)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def _reference_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
    """``flash_attn_varlen_func``: [total, H, D] inputs, sequences delimited by int32 ``cu_seqlens``."""
    assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    assert cu_seqlens_q[0] == 0 and cu_seqlens_q[-1] == q.shape[0]
    bounds = cu_seqlens_q.tolist()
    assert max(b - a for a, b in zip(bounds, bounds[1:])) <= min(max_seqlen_q, max_seqlen_k)
    parts = [_reference_flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], causal)[0]
             for a, b in zip(bounds, bounds[1:])]
    return torch.cat(parts)


@pytest.fixture
def flash_attn_reference(monkeypatch):
    """The flash-attn path of :func:`causal_attention`, wired to the reference implementation above."""
    monkeypatch.setattr(attention, "flash_attn_func", _reference_flash_attn_func)
    monkeypatch.setattr(attention, "flash_attn_varlen_func", _reference_flash_attn_varlen_func)
    monkeypatch.setattr(attention, "flash_attn_usable", lambda t: True)


@torch.library.custom_op("sdd_test::flash_attn_varlen", mutates_args=())
def _varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
               max_seqlen_q: int, max_seqlen_k: int, causal: bool) -> torch.Tensor:
    """The reference varlen function as an opaque op, as flash-attn registers its own for torch.compile."""
    return _reference_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)


@_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
    return torch.empty_like(q)


@torch.library.custom_op("sdd_test::flash_attn_varlen_backward", mutates_args=())
def _varlen_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                        max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal softmax attention's gradients written out per span (autograd does not run inside an op)."""
    rep = q.shape[1] // k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds, bounds[1:]):
        qs, do = q[a:b].float().transpose(0, 1), grad[a:b].float().transpose(0, 1)  # [H, s, D]
        ks, vs = (t[a:b].float().repeat_interleave(rep, 1).transpose(0, 1) for t in (k, v))
        scale = q.shape[-1] ** -0.5
        causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        probs = (qs @ ks.transpose(1, 2) * scale).masked_fill(~causal, float("-inf")).softmax(-1)
        dp = do @ vs.transpose(1, 2)
        ds = probs * (dp - (dp * probs).sum(-1, keepdim=True)) * scale
        dq[a:b] = (ds @ ks).transpose(0, 1).to(q.dtype)
        dk[a:b] = (ds.transpose(1, 2) @ qs).unflatten(0, (-1, rep)).sum(1).transpose(0, 1).to(k.dtype)
        dv[a:b] = (probs.transpose(1, 2) @ do).unflatten(0, (-1, rep)).sum(1).transpose(0, 1).to(v.dtype)
    return dq, dk, dv


@_varlen_backward_op.register_fake
def _(grad, q, k, v, cu_seqlens, max_seqlen):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, _, max_seqlen, _, _ = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)
    ctx.max_seqlen = max_seqlen


def _varlen_backward(ctx, grad):
    q, k, v, cu_seqlens = ctx.saved_tensors
    return (*_varlen_backward_op(grad, q, k, v, cu_seqlens, ctx.max_seqlen), None, None, None, None, None)


_varlen_op.register_autograd(_varlen_backward, setup_context=_varlen_setup)


def test_compiled_blocks_with_document_spans_compile_once_for_every_document_count(flash_attn_reference,
                                                                                  monkeypatch):
    """cu_seqlens changes length with the number of documents: with static shapes each count was a new
    graph, and the ninth stopped a fullgraph run (FailOnRecompileLimitHit). Graphs are dynamo's: counted
    under the aot_eager backend (AOTAutograd traces the dynamic count too; inductor's kernels for it are
    the GPU suite's, where flash-attn runs)."""
    from torch._dynamo.utils import counters

    from sdd_train.distributed.parallelize import apply_compile

    monkeypatch.setattr(attention, "flash_attn_varlen_func",
                        lambda q, k, v, cq, ck, mq, mk, causal: _varlen_op(q, k, v, cq, ck, mq, mk, causal))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(small_model_cfg("sdd"), attention_backend="flash"))
    apply_compile(model.parallel_plan(), backend="aot_eager")
    graphs = []
    for n_docs in range(1, 11):  # 2 to 20 spans
        doc_ids = (torch.arange(16) * n_docs // 16).expand(2, 16)
        tokens = torch.randint(0, 97, (2, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(tokens, doc_ids).float().square().mean().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[1] and graphs[1] <= graphs[0] + 1  # at most one retrace, to the dynamic count


@pytest.mark.slow
def test_training_builds_document_spans_from_the_hosts_ids(flash_attn_reference, data_cache, tmp_path, monkeypatch):
    """flash-attn's spans need their count on the host: counted from the GPU's ids, every micro-batch's
    forward waited for the GPU. The data feed builds them from the host's ids, before they move (one call per
    micro-batch), and the model takes them as they are instead of building them again from its ids."""
    import traceback

    from sdd_train.model import transformer
    from sdd_train.train.__main__ import main

    taken, callers = [], []
    forward, spans = transformer.Transformer.forward, attention.document_spans

    def recording_forward(self, tokens, doc_ids=None, *args, **kwargs):
        if torch.is_grad_enabled():  # a training step's (validation and statistics pass the ids)
            taken.append(type(doc_ids))
        return forward(self, tokens, doc_ids, *args, **kwargs)

    def recording_spans(ids, device=None, ids_there=None):
        if torch.is_grad_enabled():  # a training step's
            callers.append([frame.name for frame in traceback.extract_stack()[:-1]])
        return spans(ids, device, ids_there)

    monkeypatch.setattr(transformer.Transformer, "forward", recording_forward)
    monkeypatch.setattr(attention, "document_spans", recording_spans)
    args = small_run(tmp_path, data_cache, "data.doc_mask=true", "train.precision=bf16", "train.max_steps=2",
                     "train.eval_interval=0", "train.checkpoint_interval=0")
    assert main(args) == 0
    assert taken and set(taken) == {attention.DocumentSpans}
    assert len(callers) == len(taken)  # one per micro-batch, each by the feed, none by the model
    assert all("micro_batches" in names and "run_blocks" not in names for names in callers)


def test_document_spans():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [3, 3, 3, 3, 3, 3], [3, 4, 4, 4, 5, 5]])
    spans = attention.document_spans(doc_ids)
    # a new span at every id change and at every row start (row 2 starts with the id row 1 ended on)
    assert spans.cu_seqlens.tolist() == [0, 2, 5, 6, 12, 13, 16, 18] and spans.cu_seqlens.dtype == torch.int32


@pytest.mark.parametrize("block", ["sdd", "pre"])
def test_flash_attn_path_with_gqa_and_documents_equals_sdpa(flash_attn_reference, block):
    """Through the flash-attn entry points (GQA; documents via the varlen kernel's spans) the model
    gives SDPA's logits, with and without a document mask."""
    torch.manual_seed(0)
    cfg = small_model_cfg(block)
    flash, sdpa = Transformer(dataclasses.replace(cfg, attention_backend="flash")), Transformer(cfg)
    sdpa.load_state_dict(flash.state_dict())
    tokens = torch.randint(0, 97, (3, 16))
    doc_ids = torch.tensor([[0] * 5 + [1] * 11, [2] * 16, [3] * 7 + [4] * 2 + [5] * 7])
    assert isinstance(attention.attention_mask(doc_ids, "flash", torch.bfloat16), attention.DocumentSpans)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for ids in (None, doc_ids):
            torch.testing.assert_close(flash(tokens, ids), sdpa(tokens, ids), rtol=0, atol=3e-2)  # a misplaced boundary: ~1
        assert not torch.equal(flash(tokens, doc_ids), flash(tokens))


def test_document_spans_fall_back_to_a_dense_mask_in_fp32(flash_attn_reference):
    """fp32 cannot run flash-attn: spans handed to it become the dense document mask for SDPA ('auto')."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 3, 3, 3, 3]])
    spans = attention.document_spans(doc_ids)
    want = attention.causal_attention(q, k, v, "sdpa", attention.document_mask(doc_ids))
    torch.testing.assert_close(attention.causal_attention(q, k, v, "auto", spans), want)
    with pytest.raises(RuntimeError, match="half-precision"):
        attention.causal_attention(q, k, v, "flash", spans)


def test_an_fp32_run_with_flash_attn_installed_gets_flex_attentions_mask_not_a_dense_one(flash_attn_reference,
                                                                                          monkeypatch):
    """flash-attn takes half precision only: an fp32 run on a GPU that has it got spans it could not use, which
    became SDPA's dense mask (GQA: the math backend, every score in memory). The mask follows the q/k/v dtype:
    spans for bf16, FlexAttention's block mask for fp32, and the model's forward asks in the dtype it computes."""
    monkeypatch.setattr(attention, "flex_attention_usable", lambda t: True)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 3, 3, 3, 3]])
    assert isinstance(attention.attention_mask(doc_ids, "auto", torch.bfloat16), attention.DocumentSpans)
    assert isinstance(attention.attention_mask(doc_ids, "auto", torch.float32), attention.DocumentBlockMask)
    asked: list[torch.dtype] = []
    monkeypatch.setattr("sdd_train.model.transformer.attention_mask",
                        lambda ids, backend, dtype: asked.append(dtype))
    model, tokens = Transformer(small_model_cfg("pre")), torch.randint(0, 97, (2, 6))
    model(tokens, doc_ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens, doc_ids)
    assert asked == [torch.float32, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or attention.flash_attn_func is None, reason="needs CUDA and flash-attn")
def test_flash_attn_matches_sdpa_on_gpu():
    q = torch.randn(2, 128, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 128, 2, 64, device="cuda", dtype=torch.bfloat16), torch.randn(2, 128, 2, 64, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(attention.causal_attention(q, k, v, "flash"), attention.causal_attention(q, k, v, "sdpa"),
                               rtol=2e-2, atol=2e-2)
    doc_ids = torch.cat([torch.zeros(2, 50), torch.ones(2, 78)], dim=1).cuda()
    spans, dense = attention.attention_mask(doc_ids, "flash", torch.bfloat16), attention.document_mask(doc_ids)
    torch.testing.assert_close(attention.causal_attention(q, k, v, "flash", spans),
                               attention.causal_attention(q, k, v, "sdpa", dense), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("block", ["pre", "sdd"])
def test_bf16_training_step_on_gpu(block):
    model = Transformer(small_model_cfg(block)).cuda()
    tokens = torch.randint(0, 97, (2, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(tokens)
    logits.float().logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_attention_document_masks_train_like_sdpa_and_compile_once_on_gpu():
    """The GPU path of document masks without flash-attn (the GPU image has none): compiled blocks with
    FlexAttention's block mask give SDPA's dense-mask logits and gradients (GQA, bf16), and one graph
    serves every document count (the block mask's shapes follow the sequence length, not the documents)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = small_model_cfg("pre", d_model=64, max_seq_len=128)  # heads of 16, GQA
    flex = Transformer(cfg).cuda()
    sdpa = Transformer(dataclasses.replace(cfg, attention_backend="sdpa")).cuda()
    sdpa.load_state_dict(flex.state_dict())
    apply_compile(flex.parallel_plan())
    graphs = []
    for n_docs in range(1, 6):
        doc_ids = (torch.arange(128, device="cuda") * n_docs // 128).expand(2, 128)
        tokens = torch.randint(0, 97, (2, 128), device="cuda")
        results = []
        for model in (flex, sdpa):
            model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(tokens, doc_ids).float()
            logits.square().mean().backward()
            results.append((logits, torch.cat([p.grad.flatten() for p in model.parameters()])))
        (flex_logits, flex_grads), (sdpa_logits, sdpa_grads) = results
        torch.testing.assert_close(flex_logits, sdpa_logits, rtol=3e-2, atol=3e-2)
        assert (flex_grads - sdpa_grads).norm() <= 2e-2 * sdpa_grads.norm(), n_docs
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[0], graphs


def test_document_masks_on_a_gpu_without_flash_attn_go_to_flex_attention(monkeypatch):
    """A dense mask with GQA runs only in SDPA's math backend on CUDA (every score in memory); a GPU
    without flash-attn gets FlexAttention's block mask instead. Its forward runs on CPU too (its CPU
    backward does not): the model's logits through it equal SDPA's with the dense mask."""
    monkeypatch.setattr(attention, "flex_attention_usable", lambda t: True)
    monkeypatch.setattr(attention, "_compiled_flex_attention", lambda: __import__(
        "torch.nn.attention.flex_attention", fromlist=["flex_attention"]).flex_attention)  # eager on CPU
    torch.manual_seed(0)
    cfg = small_model_cfg("pre")
    assert cfg.n_heads != cfg.n_kv_heads  # GQA
    flex, sdpa = Transformer(cfg), Transformer(dataclasses.replace(cfg, attention_backend="sdpa"))
    sdpa.load_state_dict(flex.state_dict())
    doc_ids = torch.tensor([[0] * 5 + [1] * 11, [2] * 16, [3] * 7 + [4] * 2 + [5] * 7])
    for dtype in (torch.float32, torch.bfloat16):
        assert isinstance(attention.attention_mask(doc_ids, "auto", dtype), attention.DocumentBlockMask)
        assert isinstance(attention.attention_mask(doc_ids, "sdpa", dtype), torch.Tensor)
    tokens = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(flex(tokens, doc_ids), sdpa(tokens, doc_ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(flex(tokens, doc_ids), flex(tokens), atol=1e-3)
