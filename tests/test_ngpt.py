"""nGPT (``model.block=ngpt``): what its float64 reference (tests/reference.py) does not pin down alone:
the sign-free eigen learning rates, the unit sphere after initialisation and after every optimizer step,
the scaling vectors' stored and effective values, and the configurations it refuses."""

import pytest
import torch

import reference
from conftest import block_overrides, small_model_cfg, small_run
from sdd_train import checkpoint
from sdd_train.config import ConfigError
from sdd_train.model import BLOCKS, Transformer, check_model_config
from sdd_train.model.layers import AttentionInputs, rope_cache
from sdd_train.model.ngpt import Scale
from sdd_train.train.__main__ import main

# (parameter name suffix, the dim along which nGPT keeps it unit-norm): rows read the d_model-sized stream,
# the output projections' columns write into it
UNIT = {"embed.weight": -1, "lm_head.weight": -1, "att_proj.weight": -1, "ff_proj.weight": -1,
        "attn_out.weight": 0, "ff_out.weight": 0}


def unit_deviation(state: dict[str, torch.Tensor]) -> float:
    """The largest | ||w||_2 - 1 | over the unit-norm vectors of every matrix nGPT constrains."""
    worst, seen = 0.0, set()
    for name, w in state.items():
        for suffix, dim in UNIT.items():
            if name.endswith(suffix):
                worst = max(worst, (torch.linalg.vector_norm(w.double(), dim=dim) - 1).abs().max().item())
                seen.add(suffix)
    assert seen == set(UNIT), seen
    return worst


def test_a_new_model_is_on_the_sphere_with_its_scales_at_their_init():
    model = Transformer(small_model_cfg("ngpt"))
    assert unit_deviation(model.state_dict()) < 1e-6
    d = model.cfg.d_model
    blk = model.blocks[0]
    for scale, value, stored in [(blk.attn_rate, 0.05, d**-0.5), (blk.attention.q_gain, 1.0, d**-0.5),
                                 (blk.attention.k_gain, 1.0, d**-0.5), (blk.feed_forward.gate_gain, 1.0, 1.0),
                                 (model.logit_gain, 1.0, d**-0.5)]:
        assert torch.allclose(scale.weight, torch.full_like(scale.weight, stored))
        assert torch.allclose(scale(), torch.full_like(scale.weight, value))
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 9))
    for h in model.hidden_states(tokens):  # the embedding's rows and every block's output: unit vectors
        torch.testing.assert_close(h.norm(dim=-1), torch.ones(2, 9))
    assert model.final_norm is None and model.lm_head is not None


def test_eigen_learning_rates_enter_by_their_absolute_value():
    """|alpha_A|, |alpha_M| (nGPT): a negative stored rate steps towards the sublayer's output, not away."""
    torch.manual_seed(0)
    cfg = small_model_cfg("ngpt")
    model = reference.randomise_(Transformer(cfg).double())
    blk, x = model.blocks[0], torch.randn(1, 7, cfg.d_model, dtype=torch.float64)
    att = AttentionInputs(rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, dtype=torch.float64))
    before = blk(x, att)[0]
    with torch.no_grad():
        blk.attn_rate.weight.neg_()
        blk.ff_rate.weight.neg_()
    torch.testing.assert_close(blk(x, att)[0], before, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(before, reference.block(x, blk.state_dict(), cfg), rtol=1e-10, atol=1e-10)


def test_the_reference_reports_a_model_without_the_logit_scale(monkeypatch):
    cfg = small_model_cfg("ngpt")
    monkeypatch.setattr(BLOCKS["ngpt"], "normalized", False)
    with pytest.raises(AssertionError, match="logit_gain"):
        reference.transformer(torch.zeros(1, 3, dtype=torch.long), Transformer(cfg).state_dict(), cfg)


def test_training_keeps_the_matrices_on_the_sphere_and_moves_the_scales(tmp_path, data_cache):
    assert main(small_run(tmp_path, data_cache, *block_overrides("ngpt"), "train.max_steps=3", "train.eval_interval=0",
                          "train.precision=fp32", "optim.warmup_steps=0")) == 0
    state = checkpoint.read_model_state(checkpoint.latest(tmp_path))
    assert unit_deviation(state) < 1e-5  # each optimizer step moved them off; the projection put them back
    cfg = small_model_cfg("ngpt", d_model=64)
    stored = cfg.d_model**-0.5
    for name in ("blocks.0.attn_rate.weight", "blocks.1.attention.q_gain.weight", "logit_gain.weight"):
        assert (state[name] - stored).abs().max() > 1e-4, name  # trained (the projection leaves vectors alone)


@pytest.mark.parametrize("change,key", [
    ({"tie_embeddings": True}, "model.tie_embeddings"), ({"ffn": "moe"}, "model.ffn"),
    ({"qk_norm": "head"}, "model.qk_norm"), ({"parametrization": "mup", "mup_base_width": 16}, "model.parametrization"),
])
def test_what_ngpt_cannot_build_is_a_config_error(change, key):
    with pytest.raises(ConfigError, match=key):
        check_model_config(small_model_cfg("ngpt", **change))


def test_a_tied_ngpt_run_exits_2_before_writing(tmp_path, data_cache, capsys):
    run_dir = tmp_path / "run"
    assert main(small_run(run_dir, data_cache, "model.block=ngpt", "train.max_steps=1")) == 2
    assert "model.tie_embeddings=false" in capsys.readouterr().err
    assert not run_dir.exists()


def test_scale_stores_its_init_scaling_and_returns_its_init_value():
    s = Scale(3, init_value=0.05, init_scaling=0.25)
    assert torch.equal(s.weight.detach(), torch.full((3,), 0.25))
    torch.testing.assert_close(s(), torch.full((3,), 0.05))
    s().sum().backward()  # the gradient of the stored value carries the 0.05 / 0.25 factor
    torch.testing.assert_close(s.weight.grad, torch.full((3,), 0.2))
