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


@pytest.mark.parametrize("block,norms_per_layer,final", [
    # on top of the Pre-Norm 1B's matrices; d = 2048, kv = 512, h = 8192, head 64; every count by hand from the
    # scheme's formula; ``final``: the norm before the head, where the scheme has one
    ("pre", 2 * 2048 + 2048 + 512, 2048),  # attn_norm, ff_norm, full QK-norm over q and k
    ("post", 2 * 2048, 0),  # the two post-norms; no QK-norm, no final norm (the stream leaves a norm)
    ("deepnorm", 2 * 2048, 0),  # Post-Norm's: the residual scale is a constant
    ("reordered", 2 * 2048 + 2048 + 512, 2048),  # the sublayer output norms and full QK-norm
    ("spannorm", 3 * 2048, 0),  # the two input norms and the closing out_norm; no QK-norm
    # norms, per-head q/k norms, the attention context norm, the SDD gains of attn_out, ff_proj (2h) and ff_out
    ("sdd_pre", 2 * 2048 + 2 * 64 + 2048 + 2048 + 2 * 8192 + 2048, 2048),
    ("peri", 4 * 2048 + 2048 + 512, 2048),  # and a norm on each sublayer's output
    ("lns", 2 * 2048 + 2048 + 512, 2048),  # Pre-Norm's: the scaling has no parameters
    ("mixln", 2 * 2048, 2048),  # no QK-norm
    ("rezero", 1, 0),  # no norms; one residual gate
    ("hybridnorm", 2048 + 2048 + 512 + 512, 2048),  # ff_norm, Q-, K- and V-norm (no attention input norm)
])
def test_every_scheme_hand_count(block, norms_per_layer, final):
    d, L, V, kv, h = 2048, 16, 100352, 512, 8192
    matrices = d * (d + 2 * kv) + d * d + 3 * d * h
    model = on_meta(load_config(DENSE_1B, [f"model.block={block}"]).model)
    assert model.param_counts().total == V * d + L * (matrices + norms_per_layer) + final
    # training FLOPs are 6 per parameter (gains included) plus attention's: they move with the count alone
    pre = on_meta(load_config(DENSE_1B, ["block=pre"]).model)
    extra = model.param_counts().total - pre.param_counts().total
    assert model.flops_per_token(4096) == pytest.approx(pre.flops_per_token(4096) + 6 * extra, rel=1e-12)


def test_ngpt_hand_count():
    """nGPT: no norm gains; per layer s_q (d), s_k (kv), s_u and s_v (h each), the two eigen rates (d each);
    its own output embedding and the logit scale s_z (V); no final norm."""
    d, L, V, kv, h = 2048, 16, 100352, 512, 8192
    matrices = d * (d + 2 * kv) + d * d + 3 * d * h
    scales = d + kv + 2 * h + 2 * d
    model = on_meta(load_config(DENSE_1B, ["model.block=ngpt", "model.tie_embeddings=false"]).model)
    counts = model.param_counts()
    assert counts.total == V * d + L * (matrices + scales) + V * d + V
    assert counts.non_embedding == counts.total - V * d  # the output embedding counts, as an untied head does
    attention = 12 * L * d * 4096
    assert model.flops_per_token(4096) == pytest.approx(6 * counts.non_embedding + attention, rel=1e-12)
