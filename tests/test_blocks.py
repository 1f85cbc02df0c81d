"""Every block scheme equals its SPEC formula (tests/reference.py) in float64."""

import pytest
import torch

import reference
from conftest import ALL_BLOCKS, small_model_cfg
from sdd_train.model import BLOCKS, Transformer
from sdd_train.model.blocks import Block, register
from sdd_train.model.layers import rope_cache


def randomised(cfg, seed=0):
    """A float64 model whose gains are random, so a gain in the wrong place cannot go unnoticed."""
    torch.manual_seed(seed)
    model = Transformer(cfg).double()
    model.rope = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, dtype=torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(0.5 + torch.rand_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model


def test_registry_has_every_scheme():
    assert set(ALL_BLOCKS) <= set(BLOCKS)


@pytest.mark.parametrize("block", ALL_BLOCKS)
def test_block_matches_spec_formula(block):
    cfg = small_model_cfg(block)
    model = randomised(cfg)
    x = torch.randn(2, 11, cfg.d_model, dtype=torch.float64)
    for blk in model.blocks:
        torch.testing.assert_close(blk(x, model.rope), reference.block(x, blk, cfg), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("block", ALL_BLOCKS)
def test_whole_model_matches_reference(block):
    cfg = small_model_cfg(block, tie_embeddings=block != "sdd")
    model = randomised(cfg, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 13))
    torch.testing.assert_close(model(tokens), reference.transformer(tokens, model, cfg), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("block", ["sdd", "sdd_pre"])
def test_sdd_per_branch_ffn_norm(block):
    cfg = small_model_cfg(block, sdd_ffn_norm="per_branch")
    model = randomised(cfg)
    x = torch.randn(2, 9, cfg.d_model, dtype=torch.float64)
    blk = model.blocks[0]
    torch.testing.assert_close(blk(x, model.rope), reference.block(x, blk, cfg), rtol=1e-10, atol=1e-10)
    fused = small_model_cfg(block)
    assert not torch.allclose(blk(x, model.rope), reference.block(x, blk, fused))


@pytest.mark.parametrize("qk_norm", ["none", "head", "full"])
def test_qk_norm_override(qk_norm):
    cfg = small_model_cfg("pre", qk_norm=qk_norm)
    model = randomised(cfg)
    assert model.blocks[0].attention.qk_norm == qk_norm
    x = torch.randn(1, 7, cfg.d_model, dtype=torch.float64)
    blk = model.blocks[1]
    torch.testing.assert_close(blk(x, model.rope), reference.block(x, blk, cfg), rtol=1e-10, atol=1e-10)


def test_scheme_defaults():
    """SPEC section 3: QK-norm, SDD layers and the final norm per scheme."""
    expect = {  # qk_norm, sdd, final_norm, init
        "pre": ("full", False, True, "megatron"),
        "post": ("none", False, False, "megatron"),
        "deepnorm": ("none", False, False, "deepnorm"),
        "reordered": ("full", False, True, "megatron"),
        "sdd": ("head", True, True, "sdd"),
        "sdd_pre": ("head", True, True, "sdd"),
        "spannorm": ("none", False, False, "megatron"),
    }
    for name, (qk, sdd, final, init) in expect.items():
        cls = BLOCKS[name]
        assert (cls.qk_norm, cls.sdd, cls.final_norm, cls.init_scheme) == (qk, sdd, final, init), name


def test_spannorm_residual_scale():
    cfg = small_model_cfg("spannorm")
    cfg.spannorm.residual_scale = 0.5
    model = randomised(cfg)
    x = torch.randn(1, 5, cfg.d_model, dtype=torch.float64)
    blk = model.blocks[0]
    torch.testing.assert_close(blk(x, model.rope), reference.block(x, blk, cfg), rtol=1e-10, atol=1e-10)


def test_new_scheme_is_one_class_and_one_line():
    @register("sandwich_test")
    class Sandwich(Block):
        final_norm = True

        def forward(self, x, rope, mask=None):
            return x + self.attn_norm(self.attention(self.attn_norm(x), rope, mask))

    try:
        model = Transformer(small_model_cfg("sandwich_test"))
        assert model(torch.randint(0, 97, (1, 4))).shape == (1, 4, 97)
    finally:
        del BLOCKS["sandwich_test"]


def test_causal():
    """Changing a later token never changes earlier logits."""
    for block in ALL_BLOCKS:
        model = randomised(small_model_cfg(block))
        a = torch.randint(0, 97, (1, 10))
        b = a.clone()
        b[0, 6:] = (b[0, 6:] + 1) % 97
        torch.testing.assert_close(model(a)[:, :6], model(b)[:, :6])
