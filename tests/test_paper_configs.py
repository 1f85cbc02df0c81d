"""configs/paper/: every paper run loads, has its hand-counted size, keeps the reference's values and trains."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, SMALL_RUN
from sdd_train.config import load_config
from sdd_train.model import Transformer
from sdd_train.train.__main__ import main
from sdd_train.diagnostics.summary import read_records

PAPER = sorted((CONFIGS / "paper").glob("*.yaml"))


def dense_count(block: str) -> int:
    """SPEC section 5's dense 1B, by hand: tied embedding, per-head QK-norm in every paper run."""
    d, L, V, kv, h, hd = 2048, 16, 100352, 512, 8192, 64
    per_layer = d * (d + 2 * kv) + d * d + 2 * d * h + h * d  # fused qkv, out, fused up+gate, down
    per_layer += 2 * d + 2 * hd  # attn_norm, ff_norm, q/k norms of head_dim (gain shared by the heads)
    final = d
    if block == "sdd":
        per_layer += d + d + 2 * h + d  # context_norm; alphas of attn_out, ff_proj (fused 2h), ff_out
    if block in ("post", "deepnorm"):
        final = 0
    return V * d + L * per_layer + final


def moe_count(d: int, L: int, heads: int, E: int, k: int, h: int, sdd: bool) -> tuple[int, int]:
    """(total, active) of an untied MoE with d/heads q = k = v heads and E experts of width h, by hand."""
    V, hd = 50304, d // heads
    attn = 4 * d * d + 2 * hd + (2 * d if sdd else 0)  # qkv + out, q/k norms, (context_norm + attn_out alpha)
    expert = 3 * d * h + ((2 * h + d) if sdd else 0)  # up+gate and down, (per-expert SDD gains)
    per_layer = attn + E * expert + d * E + 2 * d  # + router + attn_norm, ff_norm
    total = 2 * V * d + L * per_layer + d
    return total, total - V * d - L * (E - k) * expert


EXPECTED = {
    "dense_baseline": (dense_count("pre"), None, 1_178_669_056),
    "dense_post": (dense_count("post"), None, 1_178_667_008),
    "dense_deepnorm": (dense_count("deepnorm"), None, 1_178_667_008),
    "dense_sdd": (dense_count("sdd"), None, 1_179_029_504),
    "moe_baseline": (*moe_count(1024, 32, 16, 64, 8, 512, sdd=False), 3_460_633_600),
    "moe_sdd": (*moe_count(1024, 32, 16, 64, 8, 512, sdd=True), 3_464_893_440),
    "olmoe_1b_7b_baseline": (*moe_count(2048, 16, 16, 64, 8, 1024, sdd=False), 6_919_100_416),
    "olmoe_1b_7b_sdd": (*moe_count(2048, 16, 16, 64, 8, 1024, sdd=True), 6_923_360_256),
}


def test_every_paper_run_is_listed():
    assert {p.stem for p in PAPER} == set(EXPECTED)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_hand_counts(path: Path):
    cfg = load_config(path)
    total, active, literal = EXPECTED[path.stem]
    with torch.device("meta"):
        counts = Transformer(cfg.model).param_counts()
    assert counts.total == total == literal
    if active is not None:
        assert counts.active == active


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_keeps_the_reference_values(path: Path):
    """The values docs/paper.md tabulates, read back from the composed config."""
    cfg = load_config(path)
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (t.seq_len, t.global_batch_size, t.seed, t.precision) == (4096, 1024, 6198, "bf16")
    assert (m.qk_norm, m.norm_eps, o.alpha_f, o.grad_clip, o.weight_decay, o.z_loss) == ("head", 1e-5, 0.1, 1.0, 0.1, 0)
    assert o.decay_gains
    # the reference's downstream evaluators: 23 tasks in both, the dense run adds 4 (arithmetic and perplexity)
    assert cfg.downstream.tasks[:2] == ["piqa", "hellaswag"] and cfg.downstream.interval == 0
    assert len(cfg.downstream.tasks) == (27 if m.ffn == "dense" else 23)
    sdd = m.block == "sdd"
    assert m.init.scheme == ("sdd" if sdd else "deepnorm" if m.block == "deepnorm" else "megatron")
    if sdd:
        assert m.init.sdd_std_multiplier * (1 / math.sqrt(2.5 * m.d_model)) == pytest.approx(0.1 / math.sqrt(2.5 * m.d_model))
    if m.ffn == "dense":
        assert (o.lr, o.warmup_tokens, o.warmup_start, o.horizon_tokens) == (3e-4, 8388608000, 0.0, 2e12)
        assert (t.micro_batch_size, t.max_steps, o.decay_embeddings) == (4, 47684, False)
        assert (m.vocab_size, m.tie_embeddings, m.rope_theta) == (100352, True, 5e5)
    else:
        assert (o.lr, o.warmup_tokens, o.warmup_start, o.horizon_tokens) == (4e-4, 1.048576e10, 0.1, 5e12)
        assert (t.micro_batch_size, o.decay_embeddings) == (1, True)
        assert (m.vocab_size, m.tie_embeddings, m.rope_theta) == (50304, False, 1e4)
        assert (m.moe.n_experts, m.moe.top_k, m.moe.renormalize) == (64, 8, False)
        assert (m.moe.lb_loss_weight, m.moe.z_loss_weight) == (0.01, 0.001 / 8)
        scale = m.moe.expert_hidden / m.moe.n_experts if sdd else 1.0
        assert m.moe.sdd_out_gain_scale == scale
        assert t.max_steps == (119210 if path.stem.startswith("olmoe") else 59605)


# The small run's corpus and shape; the paper runs keep their block, init, schedule and MoE settings.
REDUCED = [*SMALL_RUN, "model.n_heads=4", "model.n_kv_heads=2", "model.moe.n_experts=8", "model.moe.top_k=2",
           "model.moe.expert_hidden=32", "train.max_steps=3", "train.global_batch_size=4", "train.micro_batch_size=2",
           "train.eval_interval=0", "train.checkpoint_interval=0", "train.permanent_checkpoint_interval=0",
           "optim.warmup_tokens=256", "optim.horizon_tokens=1024"]


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_trains_at_reduced_size(path: Path, data_cache, tmp_path):
    assert main([str(path), *REDUCED, f"data.cache_dir={data_cache}", f"run_dir={tmp_path}"]) == 0
    records = [r for r in read_records(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] < 8 for r in records)
    # 256 warmup tokens at 256 a step: step 1 is the warmup's last, step 3 is on the cosine
    lr = load_config(tmp_path / "config.yaml").optim.lr
    assert records[0]["lr"] == pytest.approx(lr)
    assert records[2]["lr"] == pytest.approx(lr * (0.1 + 0.9 * (1 + math.cos(math.pi * 2 / 3)) / 2))


@pytest.mark.parametrize("name", ["moe_paper", "olmoe_1b_7b"])
def test_shipped_moe_recipes_decay_the_embedding_as_the_reference(name):
    assert load_config(CONFIGS / f"{name}.yaml").optim.decay_embeddings  # moe yml: decay_embeddings: true
