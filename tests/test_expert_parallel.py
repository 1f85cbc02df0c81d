"""Expert parallelism (parallel.ep, sdd_train/distributed/expert_parallel.py) with real gloo processes:
2 ranks and 2 replicas x EP 2 against one process, resharding an EP checkpoint to one process. A module of
its own so that it runs beside tests/test_distributed.py (pytest-xdist gives each module one worker)."""

from __future__ import annotations

from pathlib import Path

import pytest

import rank_pool
from sdd_train import checkpoint
from sdd_train.train.__main__ import main
from sdd_train.distributed.world import cpu_fsdp_supported
from test_distributed import (MOE, args_for, assert_same_layer_stats, assert_same_run, layer_stats, records,
                              rewound_copy, stored_chunks, torchrun)

EP = [*MOE, "parallel.ep=2", "parallel.activation_checkpointing=full", "train.checkpoint_interval=2"]


@pytest.fixture(scope="module")
def cache(data_cache) -> Path:
    if not cpu_fsdp_supported():
        pytest.skip("FSDP2 on CPU needs torch >= 2.7")
    return data_cache  # ranks that build the corpus at once build it once (sdd_train/data/corpus.py)


@pytest.fixture(scope="module")
def ep_run(cache, tmp_path_factory) -> Path:
    """The MoE of MOE with parallel.ep=2 and activation checkpointing on 2 ranks, checkpoints at steps 2 and 4."""
    work = tmp_path_factory.mktemp("ep")
    (result,) = rank_pool.launch(2, [args_for(work / "ep", cache, *EP)], work / "pool", timeout=600)
    assert result.code == 0, result.output[-3000:]
    return work / "ep"


@pytest.fixture(scope="module")
def moe_single(cache, tmp_path_factory) -> Path:
    """The MoE of MOE in one process, with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("moe_single")
    assert main(args_for(run_dir, cache, *MOE, "train.checkpoint_interval=2")) == 0
    return run_dir


def expert_keys(state: dict) -> list[str]:
    return [k for k in state if ".feed_forward.ff_" in k]


def test_expert_parallelism_on_two_ranks_matches_one_process(moe_single, ep_run):
    """parallel.ep=2 (and activation checkpointing, whose recomputation sends the rows again): each rank
    holds 4 of the 8 experts whole and receives their rows by all-to-all. Losses, aux losses, expert load,
    every layer family's gradient norm (the experts' included) and the weights after 4 steps are one
    process's (fp32, 1e-5); the checkpoint stores each expert stack as two halves of the expert dimension."""
    ep_dir = ep_run
    one, ep = records(moe_single), records(ep_dir)
    assert_same_run(one, ep, range(1, 5), rel=1e-5)
    for step in (1, 4):
        assert ep[step]["moe_lb_loss"] == pytest.approx(one[step]["moe_lb_loss"], rel=1e-5)
        assert ep[step]["moe/layer_0/load_max"] == one[step]["moe/layer_0/load_max"]
    stats_one, stats_ep = layer_stats(moe_single), layer_stats(ep_dir)
    assert any(k.startswith("grad/layer_0/expert_") for k in stats_ep[2])
    assert_same_layer_stats(stats_one, stats_ep, [2, 4])
    a, b = (checkpoint.read_model_state(checkpoint.latest(d)) for d in (moe_single, ep_dir))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    chunks = stored_chunks(checkpoint.latest(ep_dir))
    experts = expert_keys(a)
    assert experts and all(chunks[f"model.{k}"] == [(4, *a[k].shape[1:])] * 2 for k in experts)


def test_an_expert_parallel_checkpoint_resumes_on_one_process(moe_single, ep_run, cache, tmp_path):
    run_dir = rewound_copy(ep_run, tmp_path / "resumed", 2)
    assert main(args_for(run_dir, cache, *MOE, "train.checkpoint_interval=2")) == 0  # parallel.ep=1
    assert_same_run(records(moe_single), records(run_dir), range(3, 5), rel=1e-5)


def test_expert_parallelism_across_two_replicas_matches_one_process(moe_single, cache, tmp_path):
    """4 ranks: 2 replica groups (HSDP) of 2 ranks that split the experts; the experts' gradients are summed
    over the replicas."""
    result = torchrun(4, args_for(tmp_path, cache, *MOE, "parallel.dp_replicate=2", "parallel.ep=2",
                                  "train.max_steps=3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HSDP over 4 ranks (2 replicas x 2 shards, experts split over 2 ranks)" in result.stdout
    assert_same_run(records(moe_single), records(tmp_path), range(1, 4), rel=1e-5)


def test_experts_sharded_across_two_ep_groups_match_one_process(moe_single, cache, tmp_path):
    """4 ranks, parallel.ep=2: two EP groups of 2 ranks each hold all 8 experts, 4 a rank, and the 2 ranks that
    hold the same experts split each one's output features between them (all-gathered for the computation,
    the gradients reduce-scattered). Losses, grad norms and every layer family's gradient norm are one
    process's (fp32, 1e-5); the checkpoint stores each expert stack in 4 pieces and resumes in one process."""
    run = tmp_path / "run"
    result = torchrun(4, args_for(run, cache, *MOE, "parallel.ep=2", "train.checkpoint_interval=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP2 over 4 ranks, experts split over 2 ranks and sharded over 2," in result.stdout
    one = records(moe_single)
    assert_same_run(one, records(run), range(1, 5), rel=1e-5)
    assert_same_layer_stats(layer_stats(moe_single), layer_stats(run), [2, 4])
    state = checkpoint.read_model_state(checkpoint.latest(moe_single))
    chunks = stored_chunks(checkpoint.latest(run))
    experts = expert_keys(state)
    assert experts and all(chunks[f"model.{k}"] == [(4, state[k].shape[1] // 2, *state[k].shape[2:])] * 4
                           for k in experts)
    resumed = rewound_copy(run, tmp_path / "resumed", 2)
    assert main(args_for(resumed, cache, *MOE, "train.checkpoint_interval=2")) == 0  # parallel.ep=1
    assert_same_run(one, records(resumed), range(3, 5), rel=1e-5)


RESHARD_WORKER = """
import contextlib, gc, json, weakref
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.checkpoint import checkpoint
from sdd_train.config import ModelConfig, MoEConfig
from sdd_train.distributed import expert_parallel
from sdd_train.distributed.dims import ParallelDims
from sdd_train.model.moe import MoE

dist.init_process_group("gloo")
rank = dist.get_rank()
made, again = [], []  # weak references to the forward's whole expert stacks; the backward's own gathers
plain = expert_parallel._materialized
def recording(piece, shards, dtype):
    out = plain(piece, shards, dtype)
    if piece.requires_grad:
        made.append(weakref.ref(expert_parallel._root(out)))
    else:
        again.append(1)
    return out
expert_parallel._materialized = recording
cfg = ModelConfig(d_model=8, n_heads=2, n_kv_heads=2, ffn="moe", n_layers=2,
                  moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=6))
results = {}
for case in ("kept", "freed", "freed_bf16", "kept_bf16", "checkpointed"):
    torch.manual_seed(0)
    layer = MoE(cfg, sdd=True)
    with torch.no_grad():  # the layer's own init is the model's (Transformer.init_weights)
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
    # ep 1 of 2 shard ranks: every rank holds all 4 experts, each split in halves over the 2 ranks
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
    expert_parallel.apply_expert_parallel([layer], mesh, ParallelDims(1, 2, 2, ep=1),
                                          reshard_after_forward=not case.startswith("kept"))
    torch.manual_seed(1 + rank)
    x = torch.randn(16, 8)
    made.clear(), again.clear()
    bf16 = torch.autocast("cpu", torch.bfloat16) if case.endswith("bf16") else contextlib.nullcontext()
    with bf16:
        y = checkpoint(lambda t: layer(t)[0], x, use_reentrant=False) if case == "checkpointed" else layer(x)[0]
    gc.collect()
    alive = sum(ref() is not None for ref in made)
    y.float().square().sum().backward()
    grads = [p.grad.to_local().tolist() for p in layer.expert_params() if p is not None]
    results[case] = {"made": len(made), "alive": alive, "again": len(again), "y": y.tolist(), "grads": grads}
if rank == 0:
    print(json.dumps(results))
dist.destroy_process_group()
"""


def test_sharded_experts_are_freed_after_the_forward_and_gathered_again_for_the_backward(tmp_path):
    """2 ranks that split every expert in halves. Under parallel.reshard_after_forward (the default) none of the
    4 stacks the forward makes whole (2 matrices, 2 SDD gain stacks) outlives it, in fp32 and under bf16
    autocast (the matrices made in bf16, as the GEMMs take them), and the backward makes them again, to the
    outputs and gradients of keeping them, bitwise. Under activation checkpointing the checkpoint's recompute
    makes them again (forward and recompute: 8), and the backward nothing more."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(RESHARD_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for freed, kept in (("freed", "kept"), ("freed_bf16", "kept_bf16")):
        assert r[freed]["made"] == r[kept]["made"] == 4
        assert r[freed]["alive"] == 0 and r[kept]["alive"] > 0, (freed, r[freed]["alive"], r[kept]["alive"])
        assert r[freed]["again"] > 0 and r[kept]["again"] == 0
        assert r[freed]["y"] == r[kept]["y"] and r[freed]["grads"] == r[kept]["grads"]
    assert r["freed_bf16"]["y"] != r["freed"]["y"]  # bf16 did compute in bf16
    assert r["checkpointed"]["made"] == 8 and r["checkpointed"]["alive"] == 0 and r["checkpointed"]["again"] == 0
    assert r["checkpointed"]["y"] == r["kept"]["y"] and r["checkpointed"]["grads"] == r["kept"]["grads"]
