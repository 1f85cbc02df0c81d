"""FSDP2 on CPU with gloo and real processes (torchrun): equivalence, exact resume, resharding, signals."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import rank_pool
from conftest import small_run
from sdd_train.config import ConfigError
from sdd_train import checkpoint
from sdd_train.train.__main__ import main
from sdd_train.distributed.world import cpu_fsdp_supported, init_world
from sdd_train.diagnostics.summary import read_records
from sdd_train.distributed.parallelize import register_output_types
from sdd_train.model import LossOutput

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
    return {r["step"]: r for r in read_records(run_dir / "metrics.jsonl") if "loss" in r}


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


MOE = ["model.ffn=moe", "model.moe.n_experts=8", "model.moe.top_k=2", "model.moe.expert_hidden=32",
       "train.max_steps=4", "train.checkpoint_interval=0"]
VALIDATION = ["train.max_steps=4", "train.eval_interval=2", "train.eval_batches=3", "train.checkpoint_interval=0",
              "downstream.tasks=[openbook_qa,copa]", "downstream.limit=5", "downstream.batch_size=3"]
# The 2-rank runs the tests below compare, trained in one torchrun launch (tests/rank_pool.py).
TWO_RANK_RUNS = {
    "fsdp2": [],
    "batch6": ["train.global_batch_size=6"],
    # dynamo under FSDP2 (aot_eager: no kernels generated in each rank); inductor's kernels under 2 ranks are
    # `make matrix`'s compiled fsdp2 / hsdp combinations
    "compile_ac_async": ["train.compile=true", "train.compile_backend=aot_eager",
                         "parallel.activation_checkpointing=every_n", "train.async_checkpoint=true", "train.max_steps=4",
                         "train.checkpoint_interval=2"],
    "moe": [*MOE, "parallel.activation_checkpointing=full"],
    "validation": VALIDATION,
    "plain_loss": ["train.loss_chunk_size=0"],
    "muon": ["optim.name=muon", "optim.muon.ns_dtype=fp32", *MOE],  # auto is bf16 on CPUs with bf16 GEMMs
    "mup": ["model.parametrization=mup", "model.mup_base_width=32", "model.tie_embeddings=false", "train.max_steps=4",
            "train.checkpoint_interval=0"],
    "ngpt": ["model.block=ngpt", "model.tie_embeddings=false", "train.max_steps=4", "train.checkpoint_interval=4"],
}


@pytest.fixture(scope="module")
def two_ranks(cache, tmp_path_factory) -> dict[str, tuple[Path, rank_pool.PoolResult]]:
    """Each of TWO_RANK_RUNS' run directory and result."""
    work = tmp_path_factory.mktemp("two_ranks")
    jobs = [args_for(work / name, cache, *extra) for name, extra in TWO_RANK_RUNS.items()]
    results = rank_pool.launch(2, jobs, work / "pool", timeout=600)
    return {name: (work / name, result) for name, result in zip(TWO_RANK_RUNS, results)}


def two_rank_run(two_ranks, name: str) -> Path:
    run_dir, result = two_ranks[name]
    assert result.code == 0, result.output[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def fsdp2(two_ranks) -> Path:
    return two_rank_run(two_ranks, "fsdp2")


def layer_stats(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_records(run_dir / "layer_stats.jsonl")}


# fp32, 1 process against 2 ranks (torch 2.13, CPU): from the same weights (step 1, or one process
# resumed from a 2-rank checkpoint) loss and grad norm agree to 2e-7 (micro-batch gradients summed in
# another order). Over steps AdamW turns that rounding of near-zero gradient entries into weight
# differences of up to 1.2e-6; through them step 6's grad norm (a spike, 0.83 -> 1.15) differs by
# up to 4.9e-6 and its per-layer gradient norms by 1.1e-5; losses stay within 1.6e-7.
LAYER_STATS_REL = 3e-5


def assert_same_layer_stats(a: dict, b: dict, steps) -> None:
    """Per-layer gradient / parameter / update norms agree (exact global norms, not shard averages)."""
    for step in steps:
        assert a[step].keys() == b[step].keys()
        assert any(k.startswith("grad/layer_1/") for k in a[step])
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=LAYER_STATS_REL), (step, key)


def assert_same_run(a: dict[int, dict], b: dict[int, dict], steps, rel: float) -> None:
    """Loss and gradient norm (before clipping) agree to ``rel`` at every step."""
    for step in steps:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=rel), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=rel), step


def test_fsdp2_two_ranks_match_one_process(single, fsdp2, two_ranks, cache):
    one, two = records(single), records(fsdp2)
    # what deferring the reduce-scatter over the step's 2 micro-batches costs, said at start-up
    from sdd_train.config import load_config
    from sdd_train.model import Transformer

    args = args_for(fsdp2, cache)
    with torch.device("meta"):
        total = Transformer(load_config(args[0], args[1:]).model).param_counts().total
    assert (f"parallel.defer_grad_sync holds every gradient unsharded in fp32 across the 2 micro-batches of a step,"
            f" {4 * total / 2**20:,.1f} MiB on each rank") in two_ranks["fsdp2"][1].output
    assert set(one) == set(two) == set(range(1, 11))
    assert_same_run(one, two, range(1, 11), rel=1e-5)
    assert two[10]["loss"] < two[1]["loss"] - 0.5  # and it trained
    assert_same_layer_stats(layer_stats(single), layer_stats(fsdp2), range(2, 11, 2))
    # the consolidated weights agree too
    w1 = checkpoint.read_model_state(checkpoint.latest(single))
    w2 = checkpoint.read_model_state(checkpoint.latest(fsdp2))
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=5e-6, msg=name)  # measured 1.2e-6


def stored_chunks(ckpt: Path) -> dict[str, list[tuple[int, ...]]]:
    """The distinct shards (their sizes) DCP stored for each model tensor: replicas are written once."""
    metadata = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    return {key: [tuple(chunk.sizes) for chunk in md.chunks] for key, md in metadata.items()
            if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}


def test_hsdp_two_replicas_of_two_shards_match_one_process(single, cache, tmp_path):
    """4 ranks as a (2 replica groups) x (2 shards) mesh: each parameter is split in halves inside a
    group and replicated across groups; losses, grad norms and per-layer norms equal one process."""
    result = torchrun(4, args_for(tmp_path, cache, "parallel.dp_replicate=2", "train.max_steps=3",
                                  "train.checkpoint_interval=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert ", HSDP over 4 ranks (2 replicas x 2 shards)," in result.stdout
    # the schedule depends on max_steps: compare the warmup steps, where lr does not
    assert_same_run(records(single), records(tmp_path), range(1, 4), rel=1e-5)
    # replicated shards are counted once: HSDP norms equal the single-process ones
    assert_same_layer_stats(layer_stats(single), layer_stats(tmp_path), [2])
    # sharded 2-way (not 1: a (4, 1) mesh; not 4: plain FSDP2): two halves of dim 0 per tensor
    ckpt = checkpoint.latest(tmp_path)
    assert checkpoint.read_meta(ckpt)["world_size"] == 4
    full = checkpoint.read_model_state(ckpt)
    chunks = stored_chunks(ckpt)
    assert chunks.keys() == {f"model.{name}" for name in full}
    for name, tensor in full.items():
        half = (tensor.shape[0] // 2, *tensor.shape[1:])
        assert chunks[f"model.{name}"] == [half, half], name


def rewound_copy(run_dir: Path, to: Path, step: int) -> Path:
    """A copy of ``run_dir`` whose latest checkpoint is step ``step`` (the later ones removed): resuming it
    trains the rest again."""
    shutil.copytree(run_dir, to)
    ckpts = checkpoint.checkpoint_dir(to)
    for later in ckpts.glob("step_*"):
        number = later.name.removeprefix("step_")
        if number.isdigit() and int(number) > step:
            shutil.rmtree(later)
    (ckpts / "latest").write_text(f"step_{step:07d}")
    return to


def test_two_rank_checkpoint_resumes_on_one_rank(single, fsdp2, cache, tmp_path):
    run_dir = rewound_copy(fsdp2, tmp_path / "resharded", 5)
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


SLURM = Path(__file__).resolve().parents[1] / "scripts" / "slurm"


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's: its workers)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return sorted(children)


def _stopped_at(output: str, signame: str) -> int:
    found = re.findall(rf"stopped by {signame} at step (\d+);", output)
    assert len(found) == 1, output[-3000:]  # one line, from rank 0
    return int(found[0])


def _assert_complete_checkpoint(run_dir: Path, step: int) -> None:
    """The stop step's checkpoint is the one that loads, nothing is half-written, weights are finite."""
    ckpt = checkpoint.latest(run_dir)
    assert ckpt is not None and ckpt.name == f"step_{step:07d}"
    assert checkpoint.read_meta(ckpt)["step"] == step
    assert not list(checkpoint.checkpoint_dir(run_dir).glob("*.partial"))
    state = checkpoint.read_model_state(ckpt)
    assert state and all(torch.isfinite(v).all() for v in state.values())


def test_sigusr1_to_the_workers_checkpoints_exits_0_and_resumes_bitwise(fsdp2, cache, tmp_path):
    """single_node.sbatch's preemption path: Slurm sends SIGUSR1 to the batch shell only
    (``--signal=B:USR1@120``), whose trap sends it to torchrun's children, the workers, with
    ``pkill -USR1 -P $TRAIN_PID``, and not to torchrun (SIGUSR1 would kill it): the workers stop at one
    step, save it, exit 0, torchrun exits 0, and re-running resumes to the same losses, bitwise, as an
    uninterrupted run. (multi_node.sbatch's, through srun, runs in tests/test_slurm.py.)"""
    trap = re.search(r"requeue\(\) \{(.*?)\n\}", (SLURM / "single_node.sbatch").read_text(), re.S).group(1)
    assert 'pkill -USR1 -P "$TRAIN_PID"' in trap
    cmd = torchrun_cmd(2, args_for(tmp_path, cache))  # fsdp2's run
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_for_step(tmp_path, proc, 1)  # rank 0 logged a step: every rank is in the loop
        assert len(_children(proc.pid)) == 2
        subprocess.run(["pkill", "-USR1", "-P", str(proc.pid)], check=True)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    stopped_at = _stopped_at(output, "SIGUSR1")
    assert 1 <= stopped_at < 10, "the run finished before the signal"
    assert max(records(tmp_path)) == stopped_at
    _assert_complete_checkpoint(tmp_path, stopped_at)
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resume: from {checkpoint.checkpoint_dir(tmp_path) / f'step_{stopped_at:07d}'}" in result.stdout
    losses = {s: r["loss"] for s, r in records(tmp_path).items()}
    assert losses == {s: r["loss"] for s, r in records(fsdp2).items()}  # the same floats, every step


def test_sigterm_to_every_process_checkpoints_before_torchrun_ends(cache, tmp_path):
    """Slurm's own SIGTERM (time limit, ``scancel``, preemption with a grace time) goes to every
    process of the job, torchrun included. torchrun forwards it to the workers and waits up to its
    shutdown timeout (30 s) before SIGKILL: they finish the step and save in time. torchrun itself
    then exits 1 (its SignalException), so only the workers' exit 0 is ours; the exit code is
    checked in the SIGUSR1 test, where torchrun is not signalled."""
    args = args_for(tmp_path, cache, "train.max_steps=400", "train.checkpoint_interval=0", "train.precision=bf16")
    proc = subprocess.Popen(torchrun_cmd(2, args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        _wait_for_step(tmp_path, proc, 1)
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "forcefully exiting" not in output, output[-3000:]  # no worker needed torchrun's SIGKILL
    stopped_at = _stopped_at(output, "SIGTERM")
    assert max(records(tmp_path)) == stopped_at
    _assert_complete_checkpoint(tmp_path, stopped_at)


def test_batch_not_divisible_by_ranks_is_a_config_error(two_ranks):
    run_dir, result = two_ranks["batch6"]
    assert result.code == 2, result.output[-3000:]
    assert "train.global_batch_size: 6 is not a multiple of world_size (2)" in result.output
    assert not run_dir.exists()


def test_fsdp2_with_compile_ac_and_async_checkpoints_matches(single, two_ranks):
    """Everything applied at once (compile, activation checkpointing, async DCP) still trains the same model.
    Compiled with the aot_eager backend: dynamo's graphs of the blocks FSDP2 wraps, without each rank
    building inductor's kernels (those run on 2 and 4 ranks in `make matrix`)."""
    run_dir = two_rank_run(two_ranks, "compile_ac_async")
    assert_same_run(records(single), records(run_dir), range(1, 4), rel=1e-5)  # measured 5.6e-7
    assert sorted(p.name for p in checkpoint.checkpoint_dir(run_dir).glob("step_*")) == ["step_0000002",
                                                                                         "step_0000004"]


def test_moe_under_fsdp2_matches_one_process(cache, two_ranks, tmp_path):
    assert main(args_for(tmp_path / "one", cache, *MOE)) == 0
    one, two = records(tmp_path / "one"), records(two_rank_run(two_ranks, "moe"))
    assert_same_run(one, two, range(1, 5), rel=1e-5)
    for step in (1, 4):
        assert two[step]["moe_lb_loss"] == pytest.approx(one[step]["moe_lb_loss"], rel=1e-5)
        assert two[step]["moe/layer_0/load_max"] == one[step]["moe/layer_0/load_max"]  # global, not per rank


def test_muon_under_fsdp2_matches_one_process(cache, two_ranks, tmp_path):
    """Muon orthogonalises whole matrices: each rank gathers its shard of the update, and the MoE's
    expert stacks and the router go through it too. The 2-rank weights after 4 steps are one process's
    to 1e-5 (fp32, Newton-Schulz too: bf16 iterations round the ranks' last-bit differences into 3e-5)."""
    assert main(args_for(tmp_path / "one", cache, *TWO_RANK_RUNS["muon"])) == 0
    two_dir = two_rank_run(two_ranks, "muon")
    assert_same_run(records(tmp_path / "one"), records(two_dir), range(1, 5), rel=1e-5)
    one, two = (checkpoint.read_model_state(checkpoint.latest(d)) for d in (tmp_path / "one", two_dir))
    assert one.keys() == two.keys() and any(t.ndim == 3 for t in one.values())
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5


def test_mup_under_fsdp2_matches_one_process(cache, two_ranks, tmp_path):
    """µP's per-group learning rates, init and query / logit factors: 2 ranks train one process's run."""
    extra = TWO_RANK_RUNS["mup"]
    assert main(args_for(tmp_path / "one", cache, *extra)) == 0
    assert_same_run(records(tmp_path / "one"), records(two_rank_run(two_ranks, "mup")), range(1, 5), rel=1e-5)


def test_ngpt_under_fsdp2_matches_one_process(cache, two_ranks, tmp_path):
    """nGPT's projection after every step: the output projections' columns span both ranks' row shards
    (a norm reduced across ranks), the rows are local. 2 ranks' weights after 4 steps are one process's."""
    extra = TWO_RANK_RUNS["ngpt"]
    assert main(args_for(tmp_path / "one", cache, *extra)) == 0
    two_dir = two_rank_run(two_ranks, "ngpt")
    assert_same_run(records(tmp_path / "one"), records(two_dir), range(1, 5), rel=1e-5)
    one, two = (checkpoint.read_model_state(checkpoint.latest(d)) for d in (tmp_path / "one", two_dir))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    column_norms = torch.linalg.vector_norm(two["blocks.0.attention.attn_out.weight"], dim=0)
    torch.testing.assert_close(column_norms, torch.ones_like(column_norms))


def test_validation_is_split_over_ranks_and_matches_one_process(cache, two_ranks, tmp_path):
    """3 batches over 2 ranks (one rank runs a padding forward): the same named losses as one process; the
    downstream tasks' batches of 3 requests split over the ranks the same way give the same metrics."""
    one, two = tmp_path / "one", two_rank_run(two_ranks, "validation")
    assert main(args_for(one, cache, *VALIDATION)) == 0
    for prefix, marker in (("val", "val_loss"), ("downstream/", "downstream/copa")):
        v1, v2 = ({r["step"]: r for r in read_records(d / "metrics.jsonl") if marker in r} for d in (one, two))
        assert v1.keys() == v2.keys() == {2, 4}
        for step in v1:
            keys = [k for k in v1[step] if k.startswith(prefix)]
            assert marker in keys and set(keys) == {k for k in v2[step] if k.startswith(prefix)}
            for key in keys:
                assert v2[step][key] == pytest.approx(v1[step][key], rel=1e-5), (step, key)


def test_plain_loss_under_fsdp2_matches_the_fused_loss_in_one_process(single, two_ranks):
    """``single`` runs the default fused head + loss (inside the root forward, where FSDP2 has gathered
    the head weight); the plain logits-then-loss path under FSDP2 gives the same run."""
    run_dir = two_rank_run(two_ranks, "plain_loss")
    # two loss implementations round differently on top of the rank count: step 6's grad norm (the
    # spike of the comment at LAYER_STATS_REL) differs by 1.12e-5 (fused loss on 2 ranks: 4.9e-6)
    assert_same_run(records(single), records(run_dir), range(1, 11), rel=3e-5)


def test_cpu_ranks_without_fsdp2_cpu_support_are_a_config_error(monkeypatch):
    """torch < 2.7 cannot run FSDP2 on CPU: torchrun on CPU stops at once with a message, not deep
    inside the first all-gather."""
    monkeypatch.setattr(torch.cpu, "Stream", type("Stream", (), {}))  # torch 2.6's: no record_event
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"torch >= 2\.7"):
        init_world("cpu")


def test_the_models_output_is_a_pytree_of_its_tensors():
    """FSDP2 before torch 2.13 finds the tensors to hang its pre-backward all-gather on with pytree:
    a LossOutput seen as one leaf left the root's resharded parameters freed in backward (a segfault
    in every 2-rank run on torch 2.11, the GPU image's version; 2.13 looks into dataclasses itself)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    register_output_types([LossOutput])
    register_output_types([LossOutput])  # idempotent: every FSDP model applies it
    out = LossOutput(loss=torch.ones(()), ce=torch.zeros(()), expert_load=torch.ones(2, 3))
    leaves, spec = tree_flatten(out)
    assert [id(x) for x in leaves if isinstance(x, torch.Tensor)] == [id(out.loss), id(out.ce), id(out.expert_load)]
    assert tree_unflatten(leaves, spec) == out
