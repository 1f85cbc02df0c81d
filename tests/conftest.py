from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py

from sdd_train.config import InitConfig, ModelConfig  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = str(CONFIGS / "tiny.yaml")
DENSE_1B = str(CONFIGS / "dense_1b.yaml")
ALL_BLOCKS = ["pre", "post", "deepnorm", "reordered", "sdd", "sdd_pre", "spannorm"]


def small_model_cfg(block: str = "pre", **kw) -> ModelConfig:
    base = dict(block=block, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=48, vocab_size=97,
                max_seq_len=32)
    base.update(kw)
    if isinstance(base.get("init"), dict):
        base["init"] = InitConfig(**base["init"])
    return ModelConfig(**base)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One small default-corpus cache (tokenizer + tokens) shared by the training tests."""
    return tmp_path_factory.mktemp("corpus_cache")
