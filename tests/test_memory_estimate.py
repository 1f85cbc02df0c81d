"""The memory estimate (``sdd-train CONFIG --estimate-memory``) against real CPU peaks and hand counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sdd_train.config import load_config
from sdd_train.distributed.expert_parallel import balanced_sizes
from sdd_train.distributed.world import World, cpu_fsdp_supported
from sdd_train.kernels.settings import cpu_values
from sdd_train.model import Transformer
from sdd_train.plan.measured import measured_peak
from sdd_train.plan.memory import estimate_memory, largest_micro_batch
from sdd_train.train.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["train.compile=false", "model.n_layers=2", "model.d_model=128", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_hidden=256", "model.vocab_size=1024", "data.tokenizer_vocab_size=1024", "train.seq_len=64",
         "model.max_seq_len=64",
         "train.micro_batch_size=4", "train.global_batch_size=8", "train.precision=fp32"]


def small(*extra: str):
    return load_config(str(ROOT / "configs/tiny.yaml"), [*SMALL, *extra])


def small_model_parameters() -> list[torch.nn.Parameter]:
    with torch.device("meta"):
        return list(Transformer(small().model).parameters())


def test_one_process_estimate_is_the_measured_peak_and_its_split_the_hand_count():
    cfg = small()
    estimate = estimate_memory(cfg, 1)
    real = measured_peak(cfg, World(0, 1, 0, torch.device("cpu")))
    assert abs(estimate.peak / real - 1) < 0.02, (estimate, real)
    params = small_model_parameters()
    n_params = sum(p.numel() for p in params)
    assert estimate.micro_batches == 2
    assert estimate.parameters >= 4 * n_params  # fp32 weights (and the RoPE buffers)
    assert estimate.optimizer_state == 2 * 4 * n_params + 4 * len(params)  # AdamW's two moments, a step count each
    assert estimate.gradients == 4 * n_params  # the peak falls after the first micro-batch's backward


def test_checkpointing_and_sharding_lower_the_estimate():
    """Selective checkpointing keeps the matrix products' outputs: its peak lies between none and full."""
    base = estimate_memory(small(), 1)
    selective = estimate_memory(small("parallel.activation_checkpointing=selective"), 1)
    full = estimate_memory(small("parallel.activation_checkpointing=full"), 1)
    assert full.activations < selective.activations < base.activations
    if cpu_fsdp_supported():
        two = estimate_memory(small(), 2)
        steps = 4 * len(list(small_model_parameters()))  # AdamW's step counts: a scalar per parameter, not sharded
        assert two.optimizer_state - steps == (base.optimizer_state - steps) // 2  # its moments are


@pytest.mark.skipif(not cpu_fsdp_supported(), reason="FSDP2 on CPU needs torch >= 2.7")
def test_two_rank_estimate_is_at_most_the_measured_peak_and_within_fifteen_percent():
    """Everything the estimate counts is allocated, so it may not exceed the measured peak. On gloo
    the measured peak also holds what gloo's threads free late (its copies of a reduce-scatter's
    input, the unsharded gradients it still references): one to two layers' worth on this small
    model, more when the machine is loaded, and never part of the schedule the estimate models."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "benchmarks/memory_estimate.py"), "--measure", str(ROOT / "configs/tiny.yaml"), *SMALL]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    real = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    estimate = estimate_memory(small(), 2).peak
    assert 0.85 * real <= estimate <= 1.02 * real, (estimate, real)


def test_the_largest_micro_batch_fits_and_one_more_does_not():
    cfg = small()
    budget = estimate_memory(cfg, 1, 5).peak + 1000  # between the peaks of 5 and 6 sequences
    largest, at = largest_micro_batch(cfg, 1, budget)
    assert largest == 5 and at.peak <= budget < estimate_memory(cfg, 1, 6).peak
    assert largest_micro_batch(cfg, 1, 1000) == (0, None)


def test_fake_tensors_never_reach_the_cpu_kernels():
    assert cpu_values(torch.zeros(2))
    with FakeTensorMode():
        assert not cpu_values(torch.zeros(2))


def test_balanced_expert_parallel_split_sizes_add_up():
    # 10 rows over 2 ranks with 3 experts each: 5 to each rank; rank 0 receives 5 from each, over 3 experts
    assert balanced_sizes(10, 2, 3) == [5, 5, 2, 2, 1, 2, 2, 1]


def test_the_command_prints_the_split_and_refuses_a_world_the_config_cannot_use(capsys):
    config = str(ROOT / "configs/tiny.yaml")
    assert main([config, *SMALL, "--estimate-memory", "--device-memory-gib", "4"]) == 0
    out = capsys.readouterr().out
    for line in ("parameters", "gradients", "optimizer state", "activations and temporaries", "peak", "fits in 4 GiB",
                 "largest train.micro_batch_size that fits"):
        assert line in out
    assert main([config, *SMALL, "parallel.dp_replicate=2", "--estimate-memory", "--world-size", "3"]) == 2
    assert "parallel.dp_replicate" in capsys.readouterr().err
    assert main([config, *SMALL, "--estimate-memory", "--device-memory-gib", "1"]) == 2  # the 2 GiB reserve
    assert "--reserve-gib" in capsys.readouterr().err


def test_step_model_terms_follow_the_config():
    from sdd_train.plan.throughput import DEVICES, estimate_step

    h100 = DEVICES["h100"]
    base = estimate_step(small(), 8, h100, activation_bytes=2**30)
    full = estimate_step(small("parallel.activation_checkpointing=full"), 8, h100, activation_bytes=2**30)
    assert full.compute_s == pytest.approx(base.compute_s * 4 / 3)  # one more forward: 2 of the 6 FLOPs a parameter
    assert full.model_flops == base.model_flops  # recomputation is not model work: it lowers MFU
    assert estimate_step(small("parallel.activation_checkpointing=full"), 1, h100, 2**30).mfu < \
        estimate_step(small(), 1, h100, 2**30).mfu
    half = estimate_step(small("parallel.param_dtype=bf16", "train.precision=bf16"), 8, h100, activation_bytes=2**30)
    assert half.gather_bytes == base.gather_bytes / 2 and half.reduce_bytes == base.reduce_bytes  # fp32 gradients
    one = estimate_step(small(), 1, h100, activation_bytes=2**30)
    assert one.comm_s == one.exposed_comm_s == 0 and one.tokens_per_rank == 8 * base.tokens_per_rank
    assert 0 < base.exposed_comm_s <= base.comm_s
