"""torch.compile of a block (full graph, no breaks) and attention backends."""

import pytest
import torch

from conftest import small_model_cfg
from sdd_train.model import Transformer
from sdd_train.model import layers
from sdd_train.train.parallelize import apply_compile


@pytest.mark.parametrize("block", ["sdd", "pre"])
def test_compiled_blocks_match_eager(block):
    torch.manual_seed(0)
    model = Transformer(small_model_cfg(block))
    tokens = torch.randint(0, 97, (2, 16))
    eager = model(tokens)
    eager.sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    apply_compile(model)  # fullgraph=True: a graph break is an error
    compiled = model(tokens)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5 * eager.abs().max().item())
    for n, p in model.named_parameters():
        scale = eager_grads[n].abs().max().item()
        torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-5 * scale, msg=n)
    assert set(model.state_dict()) == set(Transformer(small_model_cfg(block)).state_dict())  # names unchanged


def test_sdpa_fallback_without_gqa_support(monkeypatch):
    """Older torch (no enable_gqa) repeats k/v heads; both paths agree."""
    q = torch.randn(2, 9, 4, 8)
    k, v = torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    native = layers.causal_attention(q, k, v, "sdpa")
    monkeypatch.setattr(layers, "_SDPA_HAS_GQA", False)
    torch.testing.assert_close(layers.causal_attention(q, k, v, "sdpa"), native)


def test_flash_backend_without_flash_attn_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(layers, "flash_attn_func", None)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="flash-attn"):
        layers.causal_attention(q, q, q, "flash")
    torch.testing.assert_close(layers.causal_attention(q, q, q, "auto"), layers.causal_attention(q, q, q, "sdpa"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or layers.flash_attn_func is None, reason="needs CUDA and flash-attn")
def test_flash_attn_matches_sdpa_on_gpu():
    q = torch.randn(2, 128, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 128, 2, 64, device="cuda", dtype=torch.bfloat16), torch.randn(2, 128, 2, 64, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(layers.causal_attention(q, k, v, "flash"), layers.causal_attention(q, k, v, "sdpa"),
                               rtol=2e-2, atol=2e-2)


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
