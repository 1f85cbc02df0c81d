"""µP (model.parametrization=mup, sdd_train/model/mup.py): the rules at a width multiplier, the base width
that is SP, and the coordinate check (sdd-coord-check) that tells the two apart."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY, small_model_cfg
from sdd_train.config import ConfigError, OptimConfig, load_config
from sdd_train.model import Transformer
from sdd_train.train.coord_check import FAMILIES, coord_check, growth, main
from sdd_train.train.optim import param_groups


def mup_cfg(block: str = "pre", width: int = 128, base: int = 32, **kw):
    return small_model_cfg(block, d_model=width, ffn_hidden=2 * width, parametrization="mup", mup_base_width=base, **kw)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("block", ["pre", "sdd"])
def test_at_its_base_width_a_mup_model_is_the_sp_model(block, tied):
    """Same weights, same logits to the bit, every learning rate the schedule's."""
    models = []
    for parametrization in ("sp", "mup"):
        torch.manual_seed(0)
        models.append(Transformer(small_model_cfg(block, d_model=32, parametrization=parametrization,
                                                  mup_base_width=32, tie_embeddings=tied)))
    sp, mup = models
    for (name, a), b in zip(sp.state_dict().items(), mup.state_dict().values()):
        assert torch.equal(a, b), name
    tokens = torch.randint(97, (2, 16))
    assert torch.equal(sp(tokens), mup(tokens))
    assert {g.get("lr_scale", 1.0) for g in param_groups(mup, OptimConfig())} == {1.0}


@pytest.mark.parametrize("block", ["pre", "sdd"])
def test_the_rules_at_four_times_the_base_width(block):
    """m = 4: hidden matrices' std halved and lr / 4; embedding and head std as at the base width (the
    head's 1/sqrt(32), twice SP's 1/sqrt(128)); gains, alphas and the head at the base lr; queries x 1/2
    (softmax scale sqrt(8)/32 = (1/sqrt(32)) / 2); logits x 1/4."""
    torch.manual_seed(0)
    cfg = mup_cfg(block, tie_embeddings=False)
    model = Transformer(cfg)
    sigma_base = 1 / math.sqrt(2.5 * 32) * (cfg.init.sdd_std_multiplier if block == "sdd" else 1.0)
    assert model.embed.weight.std().item() == pytest.approx(sigma_base, rel=0.05)
    q_proj = model.blocks[0].attention.att_proj.weight
    assert q_proj.std().item() == pytest.approx(sigma_base / 2, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(1 / math.sqrt(32), rel=0.05)
    assert model.blocks[0].attention.q_scale == 0.5 and model.logit_scale == 0.25
    groups = {g["name"]: g for g in param_groups(model, OptimConfig())}
    assert groups["matrices"]["lr_scale"] == 0.25
    assert all(groups[n]["lr_scale"] == 1.0 for n in ("head", "gains", "embeddings"))
    assert groups["head"]["params"] == [model.lm_head.weight]
    muon = {g["name"]: g for g in param_groups(model, OptimConfig(name="muon"))}
    assert muon["matrices"]["lr_scale"] == 0.5  # match_rms_adamw: 1 / sqrt(m)


def test_the_query_factor_is_a_softmax_scale_of_sqrt_base_head_dim_over_head_dim():
    """Attention of the µP model = float64 attention with scale sqrt(8) / 32 (heads of 32, base 8)."""
    torch.manual_seed(0)
    model = Transformer(mup_cfg("pre", qk_norm="none"))
    attention = model.blocks[0].attention
    x = torch.randn(1, 6, 128)
    q, k, v = attention.att_proj(x).split([128, attention.kv_dim, attention.kv_dim], dim=-1)
    from sdd_train.model.layers import AttentionInputs, apply_rope

    rope = model.rope
    q, k = (apply_rope(t.view(1, 6, -1, 32), rope).double() for t in (q, k))
    v = v.view(1, 6, -1, 32).double()
    k, v = (t.repeat_interleave(2, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * math.sqrt(8) / 32
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    ctx = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(1, 6, 128)
    want = torch.nn.functional.linear(ctx, attention.attn_out.weight.double())
    got = attention(x, AttentionInputs(rope, None, None))
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_coordinate_check_is_flat_under_mup_and_grows_under_sp():
    """Widths 32..128 of a 2-layer pre-norm model, untied head, 4 steps: what training changed in the
    attention and FFN outputs grows with width under SP, and stays within 40% under µP. The logits' change
    under µP carries the initial head's term W_0 dx / m, which falls as 1/sqrt(m) (half over these 4x) and
    leads at small widths; what µP forbids is growth. Measured: SP attention 1.75x, FFN 2.08x; µP
    0.93x-1.07x, logits 0.50x."""
    results = coord_check(TINY, ["model.block=pre", "model.n_layers=2", "model.tie_embeddings=false",
                                 "train.seq_len=32"], [32, 64, 128], steps=4)
    for family in ("attention", "ffn"):
        assert growth(results["sp"], family) > 1.5, family
    for family in set(FAMILIES) - {"logits"}:
        assert 0.75 < growth(results["mup"], family) < 1.4, family
    assert 0.45 < growth(results["mup"], "logits") < 1.4


def test_sdd_coord_check_writes_its_plot_and_numbers(tmp_path, capsys):
    out = tmp_path / "cc.png"
    assert main([TINY, "model.n_layers=1", "train.seq_len=16", "--widths", "16", "32",
                 "--steps", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 0 and set(__import__("json").loads(out.with_suffix(".json").read_text())) == {"sp", "mup"}
    assert "mup " in capsys.readouterr().out
    assert main([TINY, "--steps", "1", "--out", str(out)]) == 2
    assert main([TINY, "model.block=nope", "--widths", "16", "32", "--out", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_mup_needs_its_base_width():
    with pytest.raises(ConfigError, match="model.mup_base_width"):
        load_config(TINY, ["model.parametrization=mup"])
    with pytest.raises(ConfigError, match="not divisible by n_heads"):
        load_config(TINY, ["model.parametrization=mup", "model.mup_base_width=66"])
