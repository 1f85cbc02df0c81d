"""Initialisation per SPEC section 4, DeepNorm constants, SDD gain inits."""

import math

import pytest
import torch

from conftest import ALL_BLOCKS, BLOCK_FFNS, small_model_cfg
from sdd_train.config import MoEConfig
from sdd_train.model import RMSNorm, SDDLinear, Transformer
from sdd_train.model.blocks import deepnorm_alpha, deepnorm_beta

TRUNC_STD = 0.98658  # std of a unit normal truncated at +-3


def wide(block, **kw):
    base = dict(d_model=256, n_layers=8, n_heads=8, n_kv_heads=2, ffn_hidden=512, vocab_size=2048, max_seq_len=16)
    base.update(kw)
    torch.manual_seed(0)
    return Transformer(small_model_cfg(block, **base))


def assert_std(t, expected, rel=0.04, trunc=True):
    measured = t.float().std().item()
    assert measured == pytest.approx(expected * (TRUNC_STD if trunc else 1.0), rel=rel)
    if trunc:
        assert t.abs().max().item() <= 3 * expected + 1e-7


def test_deepnorm_constants():
    assert deepnorm_alpha(16) == pytest.approx(2.3784, abs=1e-4)
    assert deepnorm_beta(16) == pytest.approx(0.2973, abs=1e-4)
    model = Transformer(small_model_cfg("deepnorm", n_layers=16))
    assert all(b.residual_scale == pytest.approx(2.3784, abs=1e-4) for b in model.blocks)


def test_deepnorm_xavier_gains():
    model = wide("deepnorm")
    d, kv, L, h = 256, 64, 8, 512
    beta = deepnorm_beta(L)
    blk = model.blocks[3]
    w = blk.attention.att_proj.weight
    q, k, v = w[:d], w[d : d + kv], w[d + kv :]
    assert_std(q, math.sqrt(2 / (d + d)), trunc=False)
    assert_std(k, math.sqrt(2 / (d + kv)), trunc=False)
    assert_std(v, beta * math.sqrt(2 / (d + kv)), trunc=False)
    assert_std(blk.attention.attn_out.weight, beta * math.sqrt(2 / (d + d)), trunc=False)
    for half in blk.feed_forward.ff_proj.weight.chunk(2):
        assert_std(half, beta * math.sqrt(2 / (d + h)), trunc=False)
    assert_std(blk.feed_forward.ff_out.weight, beta * math.sqrt(2 / (h + d)), trunc=False)


@pytest.mark.parametrize("block", ["pre", "post", "reordered", "spannorm"])
def test_megatron_init(block):
    model = wide(block, tie_embeddings=False)
    sigma, L = 1 / math.sqrt(2.5 * 256), 8
    assert_std(model.embed.weight, sigma)
    assert_std(model.lm_head.weight, 256**-0.5)
    for blk in model.blocks:
        assert_std(blk.attention.att_proj.weight, sigma)
        assert_std(blk.feed_forward.ff_proj.weight, sigma)
        assert_std(blk.attention.attn_out.weight, sigma / math.sqrt(2 * L))
        assert_std(blk.feed_forward.ff_out.weight, sigma / math.sqrt(2 * L))
    assert all(torch.all(m.weight == 1) for m in model.modules() if isinstance(m, RMSNorm))


def test_scale_init_switch_and_std_multiplier():
    model = wide("spannorm", init={"depth_scaled_output": False, "std_multiplier": 0.1})
    sigma = 0.1 / math.sqrt(2.5 * 256)
    assert_std(model.embed.weight, sigma)
    assert_std(model.blocks[0].attention.attn_out.weight, sigma)


def test_megatron_init_dense_1b_sigma():
    assert 1 / math.sqrt(2.5 * 2048) == pytest.approx(0.013975, abs=1e-6)


@pytest.mark.parametrize("block", ["sdd", "sdd_pre"])
def test_sdd_init(block):
    model = wide(block)
    L, sigma = 8, 1 / math.sqrt(2.5 * 256)
    assert_std(model.embed.weight, 0.1 * sigma)  # the reference's one init_std: the embedding too
    for blk in model.blocks:
        att, ffn = blk.attention, blk.feed_forward
        for lin in (att.att_proj, att.attn_out, ffn.ff_proj, ffn.ff_out):
            assert_std(lin.weight, 0.1 * sigma)  # no depth scaling in the weights
        assert isinstance(att.attn_out, SDDLinear) and isinstance(ffn.ff_out, SDDLinear)
        torch.testing.assert_close(att.attn_out.alpha, torch.full((256,), 1 / math.sqrt(2 * L)))
        torch.testing.assert_close(ffn.ff_out.alpha, torch.full((256,), 1 / math.sqrt(2 * L)))
        assert torch.all(ffn.ff_proj.alpha == 1)
        for norm in (blk.attn_norm, blk.ff_norm, att.q_norm, att.k_norm, att.context_norm):
            assert torch.all(norm.weight == 1)


def test_sdd_std_multiplier_is_configurable():
    model = wide("sdd", init={"sdd_std_multiplier": 1.0})
    assert_std(model.blocks[0].attention.att_proj.weight, 1 / math.sqrt(2.5 * 256))
    assert_std(model.embed.weight, 1 / math.sqrt(2.5 * 256))


@pytest.mark.parametrize("block,mult,want", [("sdd", None, 0.1), ("sdd", 1.0, 1.0), ("pre", None, 1.0), ("pre", 0.5, 0.5)])
def test_the_embedding_std_is_its_own_key(block, mult, want):
    """model.init.embedding_std_multiplier sets the embedding's std alone (null: 0.1 sigma under sdd, the
    reference's; sigma otherwise); every other weight keeps its scheme's std."""
    model = wide(block, init={"embedding_std_multiplier": mult})
    sigma = 1 / math.sqrt(2.5 * 256)
    assert_std(model.embed.weight, want * sigma)
    assert_std(model.blocks[0].attention.att_proj.weight, (0.1 if block == "sdd" else 1.0) * sigma)


@pytest.mark.parametrize("block", ["pre", "post", "sdd", "sdd_pre"])
def test_moe_router_expert_and_untied_head_init(block):
    """The router takes the model's init_std (sigma, or 0.1 sigma under sdd); an untied head 1/sqrt(d) always."""
    model = wide(block, d_model=512, tie_embeddings=False, ffn="moe",
                 moe=MoEConfig(n_experts=64, top_k=8, expert_hidden=64))
    sigma, L = 1 / math.sqrt(2.5 * 512), 8
    sdd = block.startswith("sdd")
    in_std = 0.1 * sigma if sdd else sigma
    out_std = 0.1 * sigma if sdd else sigma / math.sqrt(2 * L)  # sdd: the depth scaling is in the gains
    assert_std(model.embed.weight, in_std)
    assert_std(model.lm_head.weight, 512**-0.5)
    for blk in model.blocks:
        assert_std(blk.feed_forward.router.weight, in_std)
        assert_std(blk.feed_forward.ff_proj.weight, in_std)
        assert_std(blk.feed_forward.ff_out.weight, out_std)


def test_init_weights_after_meta_construction():
    cfg = small_model_cfg("sdd", d_model=64, ffn_hidden=128)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    torch.manual_seed(0)
    eager = Transformer(cfg)
    torch.manual_seed(0)
    eager.init_weights()
    for (n, a), (_, b) in zip(model.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    torch.testing.assert_close(model.rope, eager.rope)


@pytest.mark.parametrize("block,ffn", BLOCK_FFNS)
def test_init_weights_sets_every_parameter_of_a_meta_built_model(block, ffn):
    """The trainer builds on meta and calls init_weights on uninitialised memory: nothing may be missed."""
    cfg = small_model_cfg(block, ffn=ffn, moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16))
    reference = Transformer(cfg)
    torch.manual_seed(0)
    reference.init_weights()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.fill_(float("nan"))
    torch.manual_seed(0)
    model.init_weights()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(model.rope, reference.rope)
