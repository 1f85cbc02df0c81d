"""Metrics sinks: metrics.jsonl fields, MFU arithmetic, Weights & Biases offline with no network."""

from __future__ import annotations

import pytest

from conftest import TINY, small_run
from sdd_train.config import load_config
from sdd_train.model import Transformer
from sdd_train.train.__main__ import main
from sdd_train.diagnostics.summary import read_records
from sdd_train.train.callbacks.run_log import format_line



def test_wandb_offline_and_mfu(data_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = small_run(tmp_path, data_cache, "train.eval_interval=0", "train.max_steps=3", "logging.wandb=offline",
                     "train.peak_tflops=0.001")
    assert main(args) == 0
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    run_id = (tmp_path / "wandb_id").read_text()
    assert offline[0].name.endswith(run_id)

    records = [r for r in read_records(tmp_path / "metrics.jsonl") if "loss" in r]
    cfg = load_config(TINY, args[1:])
    flops = Transformer(cfg.model).flops_per_token(cfg.train.seq_len)
    for r in records:
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_sec"] / 1e9, rel=1e-9)
        assert r["peak_mem_gib"] > 0
    assert "MFU" in format_line(records[-1], 3)


def test_wandb_bad_mode_is_a_config_error(tmp_path, capsys):
    assert main([TINY, f"run_dir={tmp_path}", "logging.wandb=cloud"]) == 2
    assert "logging.wandb: 'cloud' is not one of disabled, online, offline" in capsys.readouterr().err
