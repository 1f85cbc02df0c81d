"""benchmarks/peers.py: the other frameworks' transformers that benchmarks/step_time.py --peers times
beside ours must have our shape, or the ratios compare different models. The builders need the
extra `peers` (make bench-peers installs it into .venv-peers); without it those tests skip, and what
runs everywhere is the skip itself: a missing peer costs one line naming the extra, never an import."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark
from sdd_train.config import load_config
from sdd_train.model import Transformer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def step_time():
    return load_benchmark("step_time")


def tiny():
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["model.block=pre"])
    return cfg.model, Transformer(cfg.model)


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, ...]]:
    """Every 2-D weight's shape but the embedding's, sorted: the matmuls a step runs."""
    return sorted(tuple(p.shape) for name, p in model.named_parameters() if p.ndim == 2 and "emb" not in name)


def test_a_missing_peer_is_one_line_naming_the_extra(step_time, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("olmo_core", "torchtitan") else real(name, *a))
    assert step_time.available(["olmo-core", "torchtitan"]) == []
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("no " in line and ".[peers]" in line for line in lines)


def test_nothing_imports_the_peers_until_a_row_is_built(step_time):
    assert "olmo_core" not in sys.modules and "torchtitan" not in sys.modules


def test_olmo_core_has_our_pre_models_shape(step_time):
    pytest.importorskip("olmo_core")
    m, ours = tiny()
    peer = step_time.PEERS["olmo-core"].build(m, 256, torch.device("cpu"), False)
    # same parameter count: QK-norm over all q / k features like our pre, tied embeddings, our FFN width
    assert sum(p.numel() for p in peer.parameters()) == sum(p.numel() for p in ours.parameters())
    ours_shapes = linear_shapes(ours)  # our q|k|v and up|gate projections are fused: split them to compare
    kv = m.n_kv_heads * m.head_dim
    fused = [(m.d_model + 2 * kv, m.d_model), (2 * m.ffn_hidden, m.d_model)]
    split = [(m.d_model, m.d_model), (kv, m.d_model), (kv, m.d_model), (m.ffn_hidden, m.d_model),
             (m.ffn_hidden, m.d_model)]
    for shape in fused:
        assert ours_shapes.count(shape) == m.n_layers
    expected = sorted([s for s in ours_shapes if s not in fused] + split * m.n_layers)
    assert linear_shapes(peer) == expected


def test_torchtitan_has_our_pre_models_shape_less_qk_norm(step_time):
    pytest.importorskip("torchtitan")
    m, ours = tiny()
    peer = step_time.PEERS["torchtitan"].build(m, 256, torch.device("cpu"), False)
    qk_norm_gains = m.n_layers * (m.d_model + m.n_kv_heads * m.head_dim)  # Llama 3 has none
    assert sum(p.numel() for p in peer.parameters()) == sum(p.numel() for p in ours.parameters()) - qk_norm_gains
    kv = m.n_kv_heads * m.head_dim
    fused_qkv = (m.d_model + 2 * kv, m.d_model)  # fused like ours; the FFN's up and gate are not
    ours_shapes = linear_shapes(ours)
    up_gate = (2 * m.ffn_hidden, m.d_model)
    expected = sorted([s for s in ours_shapes if s != up_gate] + [(m.ffn_hidden, m.d_model)] * 2 * m.n_layers)
    assert linear_shapes(peer) == expected and expected.count(fused_qkv) == m.n_layers
    # the CPU change: the maskless causal SDPA inner attention, which needs no attention masks
    tokens = torch.randint(0, m.vocab_size, (2, 33))
    loss = peer(tokens[:, :-1], tokens[:, 1:])
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()

