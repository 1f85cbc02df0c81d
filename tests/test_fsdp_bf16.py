"""One precision policy for one rank and many: bf16 autocast over fp32 parameters. A 2-rank FSDP2 run in
bf16 computes what one process computes (per-step losses), and the blocks get the RoPE table in fp32
in both (FSDP2's default mixed precision would cast it to bf16 on the way into every block)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import small_run
from sdd_train.diagnostics.summary import read_records
from sdd_train.distributed.world import cpu_fsdp_supported
from sdd_train.train.__main__ import main
from sdd_train.train.callbacks import Callback

TESTS = Path(__file__).resolve().parent


class InputDtypes(Callback):
    """Records, in events.jsonl, the dtypes the first block receives in the run's first forward."""

    name = "input_dtypes"

    def on_fit_start(self, trainer) -> None:
        self.seen: dict[str, str] = {}

        def probe(module, args, kwargs) -> None:
            if not self.seen:
                x, rope = args[0], args[1].rope  # (stream, AttentionInputs)
                self.seen = {"x": str(x.dtype), "rope": str(rope.dtype)}

        trainer.module.model.blocks[0].register_forward_pre_hook(probe, with_kwargs=True)

    def post_step(self, trainer, step: int, out: Any) -> None:
        if step == trainer.start_step + 1:
            trainer.write("events", {"step": step, "event": "input_dtypes", **self.seen})


EXTRA = ["model.n_layers=3", "train.micro_batch_size=2", "optim.warmup_steps=3", "model.block=sdd",
         "train.precision=bf16", "train.eval_interval=0", "train.max_steps=8", "train.checkpoint_interval=0",
         "diagnostics.layer_stats_interval=0", "diagnostics.activation_interval=0",
         "callbacks=[{path: 'test_fsdp_bf16:InputDtypes'}]"]


def probe_record(run_dir: Path) -> dict[str, Any]:
    return next(r for r in read_records(run_dir / "events.jsonl") if r["event"] == "input_dtypes")


@pytest.mark.skipif(not cpu_fsdp_supported(), reason="FSDP2 on CPU needs torch >= 2.7")
def test_two_rank_fsdp2_in_bf16_matches_one_process_in_bf16(data_cache, tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.syspath_prepend(str(TESTS))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(small_run(one, data_cache, *EXTRA)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get(
        "PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "sdd_train.train", *small_run(two, data_cache, *EXTRA)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for run in (one, two):
        assert probe_record(run)["rope"] == str(torch.float32)  # RoPE angles stay fp32 into the block
        assert probe_record(run)["x"] == str(torch.float32)  # and so does the residual stream (fp32 embedding)
    losses = [{r["step"]: r["loss"] for r in read_records(run / "metrics.jsonl") if "loss" in r} for run in (one, two)]
    assert losses[0].keys() == losses[1].keys() == set(range(1, 9))
    for step, loss in losses[0].items():
        assert losses[1][step] == pytest.approx(loss, rel=2e-3), step  # bf16 noise: one bf16 ulp is 4e-3
