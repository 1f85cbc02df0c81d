"""Host syncs of a training step: a step that writes no record reads the device at most once.

On a GPU every read of a device value (``.item()``, ``.tolist()``, a Python ``if`` on a tensor) makes
the host wait for the queued kernels, so the next step's launches cannot overlap this step's work.
On CPU nothing waits, but the same reads dispatch ``aten._local_scalar_dense`` (``.tolist()`` of a
CPU tensor dispatches nothing, so it is counted at the method), which is what these tests count.
"""

from __future__ import annotations

import signal
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY, small_run
from sdd_train.config import load_config
from sdd_train.diagnostics.summary import read_records
from sdd_train.distributed.world import World
from sdd_train.train.__main__ import main
from sdd_train.train.callbacks import checkpointing
from sdd_train.train.stop_signals import StopSignals
from sdd_train.train.train_module import StepOutput
from sdd_train.train.trainer import Trainer

ROOT = str(Path(__file__).resolve().parents[1] / "sdd_train")
# ops that hand a tensor's value to Python: each waits for the device
READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
         torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default}
COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


def _caller() -> str:
    """The innermost sdd_train line that made the read, for the failure message."""
    frames = [f for f in traceback.extract_stack() if f.filename.startswith(ROOT)]
    return f"{frames[-1].filename[len(ROOT) - 9:]}:{frames[-1].lineno}" if frames else "outside sdd_train"


class CountReads(TorchDispatchMode):
    """Counts device-to-host reads: scalar reads, and copies to the CPU from another device."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS:
            self.reads.append(f"{func.__name__} at {_caller()}")
        elif func in COPIES:
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device", src.device)
            if src.device.type != "cpu" and torch.device(dst).type == "cpu":
                self.reads.append(f"{func.__name__} to cpu at {_caller()}")
        return func(*args, **kwargs)


def count_step_reads(monkeypatch) -> dict[int, list[str]]:
    """Every training step's reads, by step, while the real loop runs."""
    by_step: dict[int, list[str]] = {}
    active: list[CountReads] = []
    tolist = torch.Tensor.tolist

    def counted_tolist(self: torch.Tensor) -> Any:
        if active:
            active[-1].reads.append(f"tolist at {_caller()}")
        return tolist(self)

    original: Callable[[Trainer], None] = Trainer._train_step

    def step(self: Trainer) -> None:
        with CountReads() as mode:
            active.append(mode)
            try:
                original(self)
            finally:
                active.pop()
        by_step[self.step] = mode.reads

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    monkeypatch.setattr(Trainer, "_train_step", step)
    return by_step


MOE = ["model.ffn=moe", "model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=32"]


@pytest.mark.parametrize("model", [
    pytest.param([], id="dense"),
    pytest.param(MOE, id="moe"),
])
def test_a_step_without_records_reads_the_device_at_most_once(model, data_cache, tmp_path, monkeypatch):
    """Steps 2, 3, 5, 6 and 7 write nothing (records at 1, 4 and 8, the checkpoint at 8); each reads the
    device at most once. Spike detection with rollback (a decision in Python) and the skip policy for
    non-finite steps are on, so their reads are counted too."""
    by_step = count_step_reads(monkeypatch)
    args = small_run(tmp_path, data_cache, *model, "train.max_steps=8", "train.log_interval=4",
                     "train.eval_interval=0", "train.checkpoint_interval=0", "train.precision=fp32",
                     "train.nonfinite=skip", "diagnostics.spike.action=rollback", "diagnostics.layer_stats_interval=0",
                     "diagnostics.activation_interval=0")
    assert main(args) == 0
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 4, 8]
    quiet = {step: reads for step, reads in by_step.items() if step in (2, 3, 5, 6, 7)}
    assert len(quiet) == 5
    assert all(len(reads) <= 1 for reads in quiet.values()), quiet


class _Trainer:
    """What the checkpoint callback uses of the loop: a world, the config, the module, saving and stopping."""

    def __init__(self, world_size: int, tmp_path: Path) -> None:
        self.cfg = load_config(TINY, ["train.max_steps=20", "train.checkpoint_interval=6",
                                      "train.signal_check_interval=4"])
        self.world = World(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"))
        self.module = SimpleNamespace(parameters_finite=lambda: True)  # each test counts its reductions
        self.run_dir, self.saved, self.stop_reason, self.carried = tmp_path, [], None, {}

    def read_with_step(self, name: str, value: torch.Tensor) -> None:
        self.carried[name] = value

    def run_step(self, callback: checkpointing.CheckpointCallback, read_losses: bool = False) -> StepOutput:
        """The hooks of one step, as the loop calls them (``read_losses``: a callback reads the losses first)."""
        self.carried = {}
        callback.post_backward(self, self.step)
        out = StepOutput(losses=torch.zeros(4), grad_norm_tensor=torch.ones(()), carried=self.carried)
        if read_losses:
            assert out.loss == 0.0
        callback.post_step(self, self.step, out)
        return out

    def save_checkpoint(self) -> Path:
        self.saved.append(self.step)
        return self.run_dir

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason

    def log(self, message: str) -> None:
        pass


@pytest.mark.parametrize("world_size", [1, 2])
def test_ranks_agree_on_a_stop_signal_every_n_steps_and_at_checkpoints(world_size, tmp_path, monkeypatch):
    """With 2 ranks the stop flag's all-reduce (and its read) runs at steps 4, 6 (a checkpoint), 8, ...
    only, the same steps on every rank; a SIGUSR1 that arrives in step 9 stops the run at the next of
    them, 12. One process has nothing to agree on: it stops at the end of step 9, with no reduction."""
    reduced: list[int] = []
    trainer = _Trainer(world_size, tmp_path)
    monkeypatch.setattr(checkpointing, "all_reduce_max", lambda t: reduced.append(trainer.step) or t)
    trainer.module = SimpleNamespace(parameters_finite=lambda: reduced.append(trainer.step) is None)  # one reduction
    callback = checkpointing.CheckpointCallback()
    monkeypatch.setattr(checkpointing, "STOPS", StopSignals())
    for trainer.step in range(1, 21):
        if trainer.step == 9:
            checkpointing.STOPS._record(signal.SIGUSR1, None)
        trainer.run_step(callback)
        if trainer.stop_reason:
            break
    assert trainer.stop_reason == "SIGUSR1"
    # (stopped at, saved at, reductions: a save's finiteness check makes one too, after the flag's)
    expected = {1: (9, [6, 9], [6, 9]), 2: (12, [6, 12], [4, 6, 6, 8, 12, 12])}
    assert (trainer.step, trainer.saved, reduced) == expected[world_size]


def test_ranks_read_their_stop_flag_in_the_steps_one_read(tmp_path, monkeypatch):
    """At a step where ranks agree on a stop signal (step 4 of 20, no checkpoint, no record) the flag's
    all-reduce is read with the step's losses: a step whose losses a callback reads (spike detection) makes
    that one read, not a second one for the flag; a step that reads nothing else reads the flag alone."""
    trainer = _Trainer(2, tmp_path)
    monkeypatch.setattr(checkpointing, "all_reduce_max", lambda t: t)
    monkeypatch.setattr(checkpointing, "STOPS", StopSignals())
    tolist, lists = torch.Tensor.tolist, []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: lists.append(_caller()) or tolist(t))  # CPU: no dispatch
    callback, trainer.step = checkpointing.CheckpointCallback(), 4
    for read_losses in (True, False):
        lists.clear()
        with CountReads() as mode:
            out = trainer.run_step(callback, read_losses)
        assert len(mode.reads) + len(lists) == 1 and list(out.carried) == ["stop_signal"], (mode.reads, lists)
    checkpointing.STOPS._record(signal.SIGTERM, None)
    trainer.run_step(callback, read_losses=True)
    assert trainer.stop_reason == "SIGTERM"
