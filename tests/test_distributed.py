"""FSDP2 on CPU with gloo and real processes (torchrun): equivalence, exact resume, resharding, signals."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import small_run
from sdd_train.config import ConfigError
from sdd_train.train import checkpoint
from sdd_train.train.__main__ import main
from sdd_train.train.distributed import cpu_fsdp_supported, init_world
from sdd_train.train.metrics import read_metrics

EXTRA = ["model.n_layers=3", "train.micro_batch_size=2", "optim.warmup_steps=3", "model.block=sdd",
         "train.precision=fp32", "train.eval_interval=0", "train.max_steps=10", "train.checkpoint_interval=5",
         "diagnostics.layer_stats_interval=2"]


def args_for(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return small_run(run_dir, cache, *EXTRA, *extra)


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "sdd_train.train", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, args), env=ENV, capture_output=True, text=True, timeout=300)


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def cache(data_cache) -> Path:
    if not cpu_fsdp_supported():
        pytest.skip(f"FSDP2 on CPU needs torch >= 2.7 (this is {torch.__version__})")
    # Build the small corpus once in this process so concurrent ranks only ever read it.
    assert main(args_for(data_cache / "warmup_run", data_cache, "train.max_steps=1")) == 0
    return data_cache


@pytest.fixture(scope="module")
def single(cache, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    assert main(args_for(run_dir, cache)) == 0
    return run_dir


@pytest.fixture(scope="module")
def fsdp2(cache, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("fsdp2")
    result = torchrun(2, args_for(run_dir, cache))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def layer_stats(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "layer_stats.jsonl")}


def assert_same_layer_stats(a: dict, b: dict, steps) -> None:
    """Per-layer gradient / parameter / update norms agree (exact global norms, not shard averages)."""
    for step in steps:
        assert a[step].keys() == b[step].keys()
        assert any(k.startswith("grad/layer_1/") for k in a[step])
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-4, abs=1e-7), (step, key)


def assert_same_run(a: dict[int, dict], b: dict[int, dict], steps, rel: float) -> None:
    for step in steps:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=rel, abs=rel), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=100 * rel), step


def test_fsdp2_two_ranks_match_one_process(single, fsdp2):
    one, two = records(single), records(fsdp2)
    assert set(one) == set(two) == set(range(1, 11))
    assert_same_run(one, two, range(1, 11), rel=1e-5)
    assert two[10]["loss"] < two[1]["loss"] - 0.5  # and it trained
    assert_same_layer_stats(layer_stats(single), layer_stats(fsdp2), range(2, 11, 2))
    # the consolidated weights agree too
    w1 = checkpoint.read_model_state(checkpoint.latest(single))
    w2 = checkpoint.read_model_state(checkpoint.latest(fsdp2))
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)


def test_hsdp_replicate_x_shard_matches_one_process(single, cache, tmp_path):
    result = torchrun(2, args_for(tmp_path, cache, "parallel.dp_replicate=2", "train.max_steps=4",
                                  "train.checkpoint_interval=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    ref = records(single)
    # the schedule depends on max_steps: compare the warmup steps, where lr does not
    assert_same_run(ref, records(tmp_path), range(1, 4), rel=1e-5)
    # replicated shards are counted once: HSDP norms equal the single-process ones
    assert_same_layer_stats(layer_stats(single), layer_stats(tmp_path), [2])


def test_two_rank_checkpoint_resumes_on_one_rank(single, fsdp2, cache, tmp_path):
    run_dir = tmp_path / "resharded"
    shutil.copytree(fsdp2, run_dir)
    ckpts = checkpoint.checkpoint_dir(run_dir)
    shutil.rmtree(ckpts / "step_0000010")
    (ckpts / "latest").write_text("step_0000005")
    assert checkpoint.read_meta(checkpoint.latest(run_dir))["world_size"] == 2
    assert main(args_for(run_dir, cache)) == 0
    resumed = records(run_dir)
    assert set(resumed) == set(range(1, 11))
    assert_same_run(records(single), resumed, range(6, 11), rel=1e-5)


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and any(s >= step for s in records(run_dir)):
            return
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach step {step} (exit {proc.poll()})")


def test_sigkill_two_ranks_then_rerun_is_bitwise_identical(fsdp2, cache, tmp_path):
    cmd = torchrun_cmd(2, args_for(tmp_path, cache, "train.checkpoint_interval=2"))
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_step(tmp_path, proc, 5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = checkpoint.read_meta(checkpoint.latest(tmp_path))["step"]
    assert 2 <= interrupted < 10, "the run finished before it could be killed"
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = {s: r["loss"] for s, r in records(tmp_path).items()}
    assert losses == {s: r["loss"] for s, r in records(fsdp2).items()}  # the same floats, every step


def test_sigterm_checkpoints_and_exits_cleanly(cache, tmp_path):
    """Slurm preemption signals every process of the job step; the run saves and exits 0, then resumes."""
    args = args_for(tmp_path, cache, "train.max_steps=400", "train.checkpoint_interval=0", "train.precision=bf16")
    proc = subprocess.Popen(torchrun_cmd(2, args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    _wait_for_step(tmp_path, proc, 3)
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert "stopped by SIGTERM" in output, output[-3000:]
    ckpt = checkpoint.latest(tmp_path)
    assert ckpt is not None
    stopped_at = checkpoint.read_meta(ckpt)["step"]
    assert 3 <= stopped_at < 400
    state = checkpoint.read_model_state(ckpt)
    assert state and all(torch.isfinite(v).all() for v in state.values())
    # re-running resumes from that step (and a smaller max_steps finishes at once)
    result = torchrun(2, args_for(tmp_path, cache, f"train.max_steps={stopped_at + 2}", "train.checkpoint_interval=0",
                                  "train.precision=bf16"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resume: from {ckpt}" in result.stdout


def test_batch_not_divisible_by_ranks_is_a_config_error(cache, tmp_path):
    result = torchrun(2, args_for(tmp_path, cache, "train.global_batch_size=6"))
    assert result.returncode != 0
    assert "train.global_batch_size: 6 is not a multiple of world_size (2)" in result.stdout + result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_fsdp2_with_compile_ac_and_async_checkpoints_matches(single, cache, tmp_path):
    """Everything applied at once (compile, activation checkpointing, async DCP) still trains the same model."""
    result = torchrun(2, args_for(tmp_path, cache, "train.compile=true", "parallel.activation_checkpointing=every_n",
                                  "train.async_checkpoint=true", "train.max_steps=4", "train.checkpoint_interval=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(records(single), records(tmp_path), range(1, 4), rel=1e-4)
    assert sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).glob("step_*")) == ["step_0000002",
                                                                                          "step_0000004"]


def test_moe_under_fsdp2_matches_one_process(cache, tmp_path):
    moe = ["model.ffn=moe", "model.moe.n_experts=8", "model.moe.top_k=2", "model.moe.expert_hidden=32",
           "train.max_steps=4", "train.checkpoint_interval=0"]
    assert main(args_for(tmp_path / "one", cache, *moe)) == 0
    result = torchrun(2, args_for(tmp_path / "two", cache, *moe, "parallel.activation_checkpointing=full"))
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert_same_run(one, two, range(1, 5), rel=1e-5)
    for step in (1, 4):
        assert two[step]["moe_lb_loss"] == pytest.approx(one[step]["moe_lb_loss"], rel=1e-5)
        assert two[step]["moe/layer_0/load_max"] == one[step]["moe/layer_0/load_max"]  # global, not per rank


def test_validation_is_split_over_ranks_and_matches_one_process(cache, tmp_path):
    """3 batches over 2 ranks (one rank runs a padding forward): the same named losses as one process."""
    extra = ["train.max_steps=4", "train.eval_interval=2", "train.eval_batches=3", "train.checkpoint_interval=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args_for(one, cache, *extra)) == 0
    result = torchrun(2, args_for(two, cache, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    v1, v2 = ({r["step"]: r for r in read_metrics(d / "metrics.jsonl") if "val_loss" in r} for d in (one, two))
    assert v1.keys() == v2.keys() == {2, 4}
    for step in v1:
        keys = [k for k in v1[step] if k.startswith("val")]
        assert "val/stdlib/loss" in keys and set(keys) == {k for k in v2[step] if k.startswith("val")}
        for key in keys:
            assert v2[step][key] == pytest.approx(v1[step][key], rel=1e-5), (step, key)


def test_plain_loss_under_fsdp2_matches_the_fused_loss_in_one_process(single, cache, tmp_path):
    """``single`` runs the default fused head + loss (inside the root forward, where FSDP2 has gathered
    the head weight); the plain logits-then-loss path under FSDP2 gives the same run."""
    result = torchrun(2, args_for(tmp_path, cache, "train.loss_chunk_size=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(records(single), records(tmp_path), range(1, 11), rel=1e-5)


def test_cpu_ranks_without_fsdp2_cpu_support_are_a_config_error(monkeypatch):
    """torch < 2.7 cannot run FSDP2 on CPU: torchrun on CPU stops at once with a message, not deep
    inside the first all-gather."""
    monkeypatch.setattr(torch.cpu, "Stream", type("Stream", (), {}))  # torch 2.6's: no record_event
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"torch >= 2\.7"):
        init_world("cpu")
