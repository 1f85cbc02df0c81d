"""Parameter counts and FLOPs against hand counts (SPEC section 5)."""

import pytest
import torch

from conftest import DENSE_1B, TINY
from sdd_train.config import load_config
from sdd_train.model import Transformer


def on_meta(cfg):
    with torch.device("meta"):
        return Transformer(cfg)


def test_dense_1b_hand_count():
    cfg = load_config(DENSE_1B, ["block=pre"]).model
    d, L, V, kv, h = 2048, 16, 100352, 8 * 64, 8192
    embedding = V * d  # tied with the head
    attn = d * (d + 2 * kv) + d * d
    ffn = d * 2 * h + h * d
    norms = 2 * d + d + kv  # attn_norm, ff_norm, QK-norm over q (d) and k (kv)
    expected = embedding + L * (attn + ffn + norms) + d  # + final norm
    counts = on_meta(cfg).param_counts()
    assert counts.total == expected == 1_178_707_968  # "about 1.18B total with tied embeddings"
    assert counts.non_embedding == expected - embedding


def test_dense_1b_sdd_hand_count():
    cfg = load_config(DENSE_1B).model
    assert cfg.block == "sdd"
    d, L, V, kv, h, hd = 2048, 16, 100352, 512, 8192, 64
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * h  # matrices
    per_layer += 2 * d + 2 * hd + d  # attn_norm, ff_norm, per-head q/k norms, context_norm
    per_layer += d + 2 * h + d  # SDD alphas: attn_out, ff_proj (fused 2h), ff_out
    assert on_meta(cfg).param_counts().total == V * d + L * per_layer + d


def test_untied_head_counts_twice():
    cfg = load_config(DENSE_1B, ["model.tie_embeddings=false"]).model
    tied = on_meta(load_config(DENSE_1B).model).param_counts()
    assert on_meta(cfg).param_counts().total == tied.total + 100352 * 2048


def test_flops_per_token():
    cfg = load_config(DENSE_1B, ["block=pre"]).model
    model = on_meta(cfg)
    n = model.param_counts()
    expected = 6 * (n.non_embedding + 100352 * 2048) + 12 * 16 * 2048 * 4096
    assert model.flops_per_token(4096) == pytest.approx(expected)
    assert model.flops_per_token(4096) / 1e9 == pytest.approx(8.683, abs=1e-3)


def test_tiny_config_size():
    counts = on_meta(load_config(TINY).model).param_counts()
    assert 5e6 < counts.total < 8e6
