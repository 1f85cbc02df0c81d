"""Every block scheme equals its SPEC formula (tests/reference.py) in float64."""

import pytest
import torch

import reference
from conftest import ALL_BLOCKS, BLOCK_FFNS, small_model_cfg
from sdd_train.config import ModelConfig, MoEConfig
from sdd_train.model import BLOCKS, Transformer
from sdd_train.model.blocks import Block, register
from sdd_train.model.layers import AttentionInputs, rope_cache


def randomised(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A float64 model with random gains and matrices (reference.randomise_) and a float64 RoPE table."""
    torch.manual_seed(seed)
    model = Transformer(cfg).double()
    model.rope = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, dtype=torch.float64)
    return reference.randomise_(model, seed)


def assert_block_matches(blk: Block, x: torch.Tensor, rope: torch.Tensor, cfg: ModelConfig, layer: int = 0) -> None:
    """Block ``layer``'s output equals the reference block given only the block's parameter values."""
    out, aux = blk(x, AttentionInputs(rope))
    assert aux is None  # a dense feed-forward reports nothing
    torch.testing.assert_close(out, reference.block(x, blk.state_dict(), cfg, layer), rtol=1e-10, atol=1e-10)


def test_registry_has_every_scheme():
    assert set(ALL_BLOCKS) == set(reference.SCHEMES) and set(ALL_BLOCKS) <= set(BLOCKS)


@pytest.mark.parametrize("block", ALL_BLOCKS)
def test_block_matches_spec_formula(block):
    cfg = small_model_cfg(block)
    model = randomised(cfg)
    x = torch.randn(2, 11, cfg.d_model, dtype=torch.float64)
    for layer, blk in enumerate(model.blocks):
        assert_block_matches(blk, x, model.rope, cfg, layer)


@pytest.mark.parametrize("block,ffn", BLOCK_FFNS)
def test_whole_model_matches_reference(block, ffn):
    """Dense and MoE; the MoE switches vary with the scheme (renormalised combine weights under pre,
    an SDD output gain scale under sdd_pre) so that each meets the reference too."""
    cfg = small_model_cfg(block, tie_embeddings=block not in ("sdd", "ngpt"), ffn=ffn,
                          moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16, renormalize=block == "pre",
                                        sdd_out_gain_scale=0.5 if block == "sdd_pre" else 1.0))
    model = randomised(cfg, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 13))
    expected = reference.transformer(tokens, model.state_dict(), cfg)
    torch.testing.assert_close(model(tokens), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b != "ngpt"])  # nGPT builds its own attention: below
def test_structure_differing_from_spec_fails(block, monkeypatch):
    """The reference takes its structure from SPEC, not the model: SDD layers in a plain scheme (or
    plain ones in an SDD scheme) and a QK-norm of the wrong kind are reported, not mirrored."""
    cfg = small_model_cfg(block)
    monkeypatch.setattr(BLOCKS[block], "sdd", not reference.SCHEMES[block].sdd)
    with pytest.raises(AssertionError, match="alpha"):
        reference.transformer(torch.zeros(1, 3, dtype=torch.long), Transformer(cfg).state_dict(), cfg)
    monkeypatch.undo()
    monkeypatch.setattr(BLOCKS[block], "qk_norm", "head" if reference.SCHEMES[block].qk_norm == "full" else "full")
    with pytest.raises(AssertionError, match="q_norm"):
        reference.transformer(torch.zeros(1, 3, dtype=torch.long), Transformer(cfg).state_dict(), cfg)


@pytest.mark.parametrize("block", ["sdd", "sdd_pre"])
def test_sdd_per_branch_ffn_norm(block):
    cfg = small_model_cfg(block, sdd_ffn_norm="per_branch")
    model = randomised(cfg)
    x = torch.randn(2, 9, cfg.d_model, dtype=torch.float64)
    blk = model.blocks[0]
    assert_block_matches(blk, x, model.rope, cfg)
    fused = small_model_cfg(block)
    assert not torch.allclose(blk(x, AttentionInputs(model.rope))[0], reference.block(x, blk.state_dict(), fused))


@pytest.mark.parametrize("block", ["pre", "sdd"])
@pytest.mark.parametrize("qk_norm", ["none", "head", "full"])
def test_qk_norm_override(block, qk_norm):
    cfg = small_model_cfg(block, qk_norm=qk_norm)
    model = randomised(cfg)
    x = torch.randn(1, 7, cfg.d_model, dtype=torch.float64)
    assert_block_matches(model.blocks[1], x, model.rope, cfg)


def test_scheme_defaults():
    """SPEC section 3: QK-norm, SDD layers and the final norm per scheme (the reference's table), and the init."""
    inits = {"deepnorm": "deepnorm", "sdd": "sdd", "sdd_pre": "sdd"}
    for name, s in reference.SCHEMES.items():
        cls = BLOCKS[name]
        expected = (s.qk_norm, s.sdd, s.final_norm, inits.get(name, "megatron"))
        assert (cls.qk_norm, cls.sdd, cls.final_norm, cls.init_scheme) == expected, name


@pytest.mark.parametrize("block", ["lns", "mixln"])
def test_depth_dependent_schemes_differ_by_layer(block):
    """LayerNorm Scaling's 1/sqrt(l) and Mix-LN's Post-Norm blocks (the first floor(0.5 x 4) = 2 here) follow
    the layer index: each block equals the reference of its own layer and not of another's."""
    cfg = small_model_cfg(block, n_layers=4)
    cfg.mixln.post_fraction = 0.5
    model = randomised(cfg)
    x = torch.randn(1, 6, cfg.d_model, dtype=torch.float64)
    assert [blk.post for blk in model.blocks] == [True, True, False, False] if block == "mixln" else True
    for layer, blk in enumerate(model.blocks):
        assert_block_matches(blk, x, model.rope, cfg, layer)
        other = reference.block(x, blk.state_dict(), cfg, 3 - layer if block == "mixln" else layer + 1)
        assert not torch.allclose(blk(x, AttentionInputs(model.rope))[0], other)


def test_spannorm_residual_scale():
    cfg = small_model_cfg("spannorm")
    cfg.spannorm.residual_scale = 0.5
    model = randomised(cfg)
    x = torch.randn(1, 5, cfg.d_model, dtype=torch.float64)
    assert_block_matches(model.blocks[0], x, model.rope, cfg)


def test_new_scheme_is_one_class_and_one_line():
    @register("sandwich_test")
    class Sandwich(Block):
        final_norm = True

        def forward(self, x, att):
            h = x + self.attn_norm(self.attention(self.attn_norm(x), att))
            f, aux = self.feed_forward(self.ff_norm(h))
            return h + self.ff_norm(f), aux

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


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_a_forward_writes_no_module_state(ffn):
    """Everything a forward computes is returned (losses, loads; the KV cache is an argument): no
    attribute of any module changes, which dynamo refuses inside a checkpointed, compiled region, and
    no parameter or buffer is replaced or written in place (a tensor's version counts its in-place writes)."""
    cfg = small_model_cfg("sdd", ffn=ffn, moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16))
    model = Transformer(cfg)

    def state() -> dict[str, dict[str, object]]:
        return {name: {**{k: id(v) for k, v in vars(m).items()},
                       **{f"{k} tensor": (id(t), t._version) for k, t in [*m._parameters.items(), *m._buffers.items()]
                          if t is not None}}
                for name, m in model.named_modules()}

    before = state()
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    out.loss.backward()
    cache = model.new_cache(2, 16)
    model(tokens[:, :4], cache=cache)
    model(tokens[:, 4:5], cache=cache)
    assert state() == before
    assert (out.expert_load is None) == (ffn == "dense")


def test_rezero_blocks_start_as_the_identity():
    """The gate is zero after init_weights: the stream leaves every block as it came in, and the logits
    are the embedding's products with itself (tied head, no final norm)."""
    cfg = small_model_cfg("rezero")
    model = Transformer(cfg)
    model.init_weights()
    tokens = torch.randint(0, cfg.vocab_size, (1, 6))
    x = model.embed(tokens)
    torch.testing.assert_close(model.hidden_states(tokens)[-1], x)
    torch.testing.assert_close(model(tokens), x @ model.embed.weight.T)
