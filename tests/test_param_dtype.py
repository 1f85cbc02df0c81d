"""parallel.param_dtype=bf16 (the reference's FSDP "mixed"): FSDP2 gathers and computes with bf16 copies of
the fp32 parameters, and one process computes the same thing. One process is checked bitwise against a model
whose parameters are bf16 leaves (FSDP2's unsharded parameters) with gradients accumulated in fp32 (its
reduction dtype), with and without activation checkpointing; a 2-rank run against one process per step."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import small_model_cfg, small_run, TINY
from sdd_train.config import MoEConfig, ParallelConfig
from sdd_train.diagnostics.summary import read_records
from sdd_train.distributed.parallelize import apply_activation_checkpointing, parallelize
from sdd_train.distributed.world import World, cpu_fsdp_supported
from sdd_train.model import Transformer
from sdd_train.train.__main__ import main
from sdd_train.train.callbacks import Callback

TESTS = Path(__file__).resolve().parent
ONE_PROCESS = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def bf16_leaves(model: Transformer) -> Transformer:
    """What FSDP2 computes with: the same model with bf16 parameters (leaves)."""
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.data = p.data.to(torch.bfloat16)
    return twin


def train_micro_batches(model: Transformer, batches: list[torch.Tensor]) -> tuple[list[float], list[torch.Tensor]]:
    """Per-micro-batch losses and the fp32 gradients summed over the micro-batches (FSDP2 accumulates the
    bf16 gradients of its micro-batches in its reduce dtype, fp32)."""
    losses, grads = [], [torch.zeros(p.shape) for p in model.parameters()]
    for tokens in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens, targets=tokens.roll(-1, dims=1))
        out.loss.backward()
        losses.append(out.loss.item())
        for g, p in zip(grads, model.parameters()):
            g += p.grad.float()
            p.grad = None
    return losses, grads


@pytest.mark.parametrize("block,ffn,ac", [("sdd", "dense", "none"), ("pre", "dense", "full"),
                                          ("sdd", "dense", "full"), ("sdd", "moe", "full")])
def test_one_process_computes_with_the_bf16_parameters_fsdp2_gathers(block, ffn, ac):
    torch.manual_seed(0)
    model = Transformer(small_model_cfg(block, ffn=ffn, moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16)))
    fsdp2 = bf16_leaves(model)
    par = ParallelConfig(param_dtype="bf16", activation_checkpointing=ac)
    parallelize(model.parallel_plan(), par, ONE_PROCESS.dims, ONE_PROCESS.device, compile=False)
    apply_activation_checkpointing(fsdp2.parallel_plan(), ac, 1)
    batches = [torch.randint(0, 97, (2, 16)) for _ in range(2)]
    ours, reference = train_micro_batches(model, batches), train_micro_batches(fsdp2, batches)
    assert ours[0] == reference[0]
    for (name, _), g, ref in zip(model.named_parameters(), ours[1], reference[1]):
        assert torch.equal(g, ref), name
    # outside a forward the model holds its fp32 master weights: the optimizer, checkpoints and statistics see them
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in model.parameters())
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())


@pytest.mark.parametrize("overrides,message", [
    (["parallel.param_dtype=bf16", "train.precision=fp32"], "train.precision=bf16"),
    (["parallel.param_dtype=fp16"], "fp32, bf16"),
])
def test_a_bad_param_dtype_exits_2_in_one_line(overrides, message, capsys):
    assert main([TINY, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "parallel.param_dtype" in err and message in err and len(err.splitlines()) == 1


class Dtypes(Callback):
    """Records in events.jsonl the dtypes the first block receives in the first forward, and those FSDP2
    all-gathers in."""

    name = "dtypes"

    def on_fit_start(self, trainer) -> None:
        import torch.distributed as dist

        self.seen: dict[str, Any] = {"gathered": set()}

        def probe(module, args, kwargs) -> None:
            if "x" not in self.seen:
                self.seen.update(x=str(args[0].dtype), rope=str(args[1].rope.dtype))  # (stream, AttentionInputs)

        trainer.module.model.blocks[0].register_forward_pre_hook(probe, with_kwargs=True)
        name = next(n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n))
        gather = getattr(dist, name)

        def recording(output, *args, **kwargs):
            self.seen["gathered"].add(str(output.dtype))
            return gather(output, *args, **kwargs)

        setattr(dist, name, recording)

    def post_step(self, trainer, step: int, out: Any) -> None:
        if step == trainer.start_step + 1:
            trainer.write("events", {"step": step, "event": "dtypes", **self.seen,
                                     "gathered": sorted(self.seen["gathered"])})


EXTRA = ["model.n_layers=3", "train.micro_batch_size=2", "optim.warmup_steps=3", "model.block=sdd",
         "train.precision=bf16", "parallel.param_dtype=bf16", "train.eval_interval=0", "train.max_steps=8",
         "train.checkpoint_interval=0", "diagnostics.layer_stats_interval=0", "diagnostics.activation_interval=0",
         "callbacks=[{path: 'test_param_dtype:Dtypes'}]"]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_records(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.mark.skipif(not cpu_fsdp_supported(), reason="FSDP2 on CPU needs torch >= 2.7")
def test_two_rank_fsdp2_with_bf16_parameters_matches_one_process(data_cache, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(small_run(one, data_cache, *EXTRA)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get(
        "PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "sdd_train.train", *small_run(two, data_cache, *EXTRA)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [next(r for r in read_records(run / "events.jsonl") if r["event"] == "dtypes") for run in (one, two)]
    for probe in seen:
        assert probe["x"] == str(torch.bfloat16)  # the embedding output, so the residual stream, is bf16
        assert probe["rope"] == str(torch.float32)  # the RoPE table is a buffer: not cast
    assert seen[1]["gathered"] == [str(torch.bfloat16)]  # half the bytes of an fp32 all-gather
    one_losses, two_losses = losses(one), losses(two)
    assert one_losses.keys() == two_losses.keys() == set(range(1, 9))
    for step, loss in one_losses.items():
        assert two_losses[step] == pytest.approx(loss, rel=2e-3), step  # bf16 noise: one bf16 ulp is 4e-3


def test_a_resumed_bf16_parameter_run_is_bitwise_the_uninterrupted_one(data_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TESTS))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    # the cosine's horizon is fixed: by default it is train.max_steps, which the stop at step 3 changes
    run = [*EXTRA, "train.max_steps=6", "train.checkpoint_interval=3", "optim.horizon_steps=6"]
    assert main(small_run(whole, data_cache, *run)) == 0
    assert main(small_run(resumed, data_cache, *run, "train.max_steps=3")) == 0
    capsys.readouterr()
    assert main(small_run(resumed, data_cache, *run)) == 0
    assert "resume: from" in capsys.readouterr().out
    assert losses(resumed) == losses(whole)


def test_every_precision_name_the_config_offers_has_a_dtype():
    """train.precision, parallel.param_dtype and optim.muon.ns_dtype look their names up in one table."""
    from sdd_train.config.schema import NS_DTYPES, PARAM_DTYPE_NAMES, PRECISIONS
    from sdd_train.kernels.precision import DTYPES

    assert {*PRECISIONS, *PARAM_DTYPE_NAMES, *NS_DTYPES} - {"auto"} <= DTYPES.keys()
