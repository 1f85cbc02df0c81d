"""Stability diagnostics: per-layer norms, activation statistics, loss-spike actions."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import small_model_cfg, small_run
from sdd_train.config import SpikeConfig
from sdd_train.data.loader import MixtureLoader
from sdd_train.diagnostics.activations import activation_stats, similarity_matrix
from sdd_train.diagnostics.layer_stats import LayerStats, family_of
from sdd_train.diagnostics.spikes import SpikeDetector
from sdd_train.model import Transformer
from sdd_train import checkpoint
from sdd_train.train.__main__ import main
from sdd_train.diagnostics.summary import read_records

# --------------------------------------------------------------------------- activation statistics


def test_similarity_of_identity_blocks_is_all_ones():
    model = Transformer(small_model_cfg("pre"))
    for block in model.blocks:
        block.forward = lambda x, att: (x, None)
    stats = activation_stats(model, torch.randint(0, 97, (2, 16)))
    n = len(model.blocks) + 1
    assert torch.tensor(stats["similarity"]) == pytest.approx(torch.ones(n, n), abs=1e-6)
    assert stats["rms"] == pytest.approx([stats["rms"][0]] * n)


def test_similarity_of_a_known_toy_case():
    e1, e2 = torch.eye(2)
    # one token: h0 = e1, h1 = e1 + e2 (45 degrees), h2 = -3 e1 (opposite, scale ignored)
    states = [e1[None], (e1 + e2)[None], (-3 * e1)[None]]
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[1, r, -1], [r, 1, -r], [-1, -r, 1]])
    assert similarity_matrix(states) == pytest.approx(expected, abs=1e-6)
    # two tokens: the same direction at one, orthogonal at the other -> mean cosine 0.5
    assert similarity_matrix([torch.stack([e1, e1]), torch.stack([e1, e2])])[0, 1].item() == pytest.approx(0.5)


def test_activation_stats_of_a_real_model_match_hidden_states():
    model = Transformer(small_model_cfg("sdd"))
    tokens = torch.randint(0, 97, (2, 16))
    stats = activation_stats(model, tokens)
    states = model.hidden_states(tokens)
    assert stats["rms"] == pytest.approx([s.square().mean().sqrt().item() for s in states], rel=1e-5)
    sim = torch.tensor(stats["similarity"])
    assert torch.diagonal(sim) == pytest.approx(torch.ones(len(states)), abs=1e-5)
    cos01 = torch.nn.functional.cosine_similarity(states[0], states[1], dim=-1).mean()
    assert sim[0, 1].item() == pytest.approx(cos01.item(), abs=1e-5)
    assert model.training  # left in the mode it was in


# --------------------------------------------------------------------------- per-layer norms


def test_parameter_families():
    assert family_of("blocks.3.attention.att_proj.weight", False) == (3, "att_proj")
    assert family_of("blocks.0.feed_forward.ff_out.alpha", False) == (0, "gains")
    assert family_of("blocks.2.attention.q_norm.weight", False) == (2, "gains")
    assert family_of("blocks.1.feed_forward.ff_proj.weight", True) == (1, "expert_proj")
    assert family_of("blocks.1.feed_forward.router.weight", True) == (1, "router")
    assert family_of("embed.weight", False) == (None, "embed")
    assert family_of("final_norm.weight", False) == (None, "final_norm")


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_layer_norms_equal_a_direct_computation(ffn):
    torch.manual_seed(0)
    cfg = small_model_cfg("sdd", ffn=ffn)
    cfg.moe.n_experts, cfg.moe.top_k, cfg.moe.expert_hidden = 4, 2, 16
    model = Transformer(cfg)
    model(torch.randint(0, 97, (2, 16))).square().mean().backward()
    stats = LayerStats(model)
    grads = stats.gradients()
    named = dict(model.named_parameters())
    expert = "expert_out" if ffn == "moe" else "ff_out"
    w = named["blocks.1.feed_forward.ff_out.weight"].grad
    assert grads[f"grad/layer_1/{expert}"] == pytest.approx(w.norm().item(), rel=1e-6)
    gains = [p.grad for n, p in named.items() if n.startswith("blocks.2.") and (n.endswith("alpha") or "norm" in n)]
    assert grads["grad/layer_2/gains"] == pytest.approx(torch.cat([g.flatten() for g in gains]).norm().item(), rel=1e-6)
    # the groups partition the parameters: together they give the global gradient norm
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert math.sqrt(sum(v**2 for v in grads.values())) == pytest.approx(total, rel=1e-6)
    if ffn == "moe":
        assert "grad/layer_0/router" in grads

    before = stats.snapshot()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # an "update" of exactly half of each parameter
    updates = stats.updates(before)
    assert updates["update/layer_0/att_proj"] == pytest.approx(0.5, rel=1e-6)
    assert updates["param/embed"] == pytest.approx(1.5 * before[0].norm().item(), rel=1e-6)


# --------------------------------------------------------------------------- spike detection


def test_spike_detector_rules():
    det = SpikeDetector(SpikeConfig(window=5, min_history=3, loss_sigmas=3.0, grad_norm_sigmas=0.0,
                                    min_increase=0.1))
    assert det.check(100.0, 1.0) == []  # too little history
    for loss in (4.0, 4.1, 3.9):
        det.accept(loss, 1.0)
    assert det.check(4.2, 1e6) == []  # within 3 sigma; grad norm not watched
    assert det.check(4.35, 1.0) == []  # above 3 sigma (std 0.08) but less than 10% above the mean
    (spike,) = det.check(5.0, 1.0)
    assert spike.metric == "loss" and spike.mean == pytest.approx(4.0) and spike.threshold == pytest.approx(4.4)
    restored = SpikeDetector(det.cfg)
    restored.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert restored.check(5.0, 1.0) == det.check(5.0, 1.0)


SPIKE_AT = 16  # the step whose batch is replaced by a bad one
RUN = ["train.max_steps=22", "train.precision=fp32", "train.eval_interval=0", "train.checkpoint_interval=10",
       "diagnostics.spike.window=8", "diagnostics.spike.min_history=5", "diagnostics.spike.loss_sigmas=4",
       "diagnostics.spike.grad_norm_sigmas=0", "data.prefetch=false", "diagnostics.layer_stats_interval=5"]
GLOBAL_BATCH = 8


@pytest.fixture
def data_stream(monkeypatch):
    """Patch the loader: ``bad`` -> a garbage batch at SPIKE_AT; ``removed`` -> that batch left out."""
    original = MixtureLoader.batch
    position = (SPIKE_AT - 1) * GLOBAL_BATCH

    def use(mode: str) -> None:
        def batch(self, consumed, start, size):
            if mode == "removed" and consumed >= position:
                consumed += GLOBAL_BATCH
            out = original(self, consumed, start, size)
            if mode == "bad" and consumed == position:
                out["targets"] = torch.full_like(out["targets"], 7)  # confidently wrong everywhere
            return out

        monkeypatch.setattr(MixtureLoader, "batch", batch)

    return use


def events(run_dir):
    path = run_dir / "events.jsonl"
    return read_records(path) if path.is_file() else []


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_records(run_dir / "metrics.jsonl") if "loss" in r}


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return checkpoint.read_model_state(checkpoint.latest(run_dir))


def test_planted_spike_is_logged_and_training_is_unchanged(tmp_path, data_cache, data_stream):
    data_stream("bad")
    off, logged = tmp_path / "off", tmp_path / "log"
    assert main(small_run(off, data_cache, *RUN, "diagnostics.spike.action=none")) == 0
    assert main(small_run(logged, data_cache, *RUN, "diagnostics.spike.action=log")) == 0
    assert events(off) == []
    (event,) = events(logged)
    assert event["step"] == SPIKE_AT and event["action"] == "log"
    assert event["triggers"][0]["metric"] == "loss" and event["loss"] > event["triggers"][0]["threshold"]
    assert losses(off) == losses(logged)


def test_planted_spike_is_skipped(tmp_path, data_cache, data_stream):
    data_stream("bad")
    assert main(small_run(tmp_path, data_cache, *RUN, "diagnostics.spike.action=skip")) == 0
    (event,) = events(tmp_path)
    assert event["step"] == SPIKE_AT and event["action"] == "skip"
    records = [r for r in read_records(tmp_path / "metrics.jsonl") if "loss" in r]
    assert records[-1]["step"] == 22 and records[-1]["spike_skips"] == 1
    assert "spike_skips" not in next(r for r in records if r["step"] == SPIKE_AT - 1)


def test_rollback_resumes_from_the_checkpoint_and_skips_the_bad_batch(tmp_path, data_cache, data_stream):
    """Rolling back from the spike, with batches read in the loop or prefetched (the default), equals a
    run whose data never contained the bad batch."""
    clean = tmp_path / "clean"
    data_stream("removed")
    assert main(small_run(clean, data_cache, *RUN, "diagnostics.spike.action=rollback")) == 0
    assert events(clean) == []
    data_stream("bad")
    for prefetch in ("false", "true"):
        rolled = tmp_path / f"rolled_prefetch_{prefetch}"
        assert main(small_run(rolled, data_cache, *RUN, "diagnostics.spike.action=rollback",
                              f"data.prefetch={prefetch}")) == 0
        (event,) = events(rolled)
        assert event["step"] == SPIKE_AT and event["action"] == "rollback" and event["rolled_back_to"] == 10
        assert event["skipped_positions"] == [(SPIKE_AT - 1) * GLOBAL_BATCH]
        assert losses(rolled) == losses(clean), prefetch  # bitwise, every step (the replayed ones are logged once)
        a, b = final_weights(rolled), final_weights(clean)
        assert all(torch.equal(a[k], b[k]) for k in a), prefetch
        stats = [r["step"] for r in read_records(rolled / "layer_stats.jsonl")]
        assert stats == [5, 10, 15, 20, 22]
        meta = checkpoint.read_meta(checkpoint.latest(rolled))
        assert meta["callbacks"]["stability"]["rollbacks"] == 1
        assert meta["data"]["skipped_positions"] == event["skipped_positions"]
