"""Checkpoint lifecycle in one process: crash during a save, retention, async save, export, non-finite steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import small_run
from sdd_train.model import transformer
from sdd_train import checkpoint
from sdd_train.checkpoint import storage
from sdd_train.train.__main__ import main
from sdd_train.eval.export import export
from sdd_train.eval.inference import load_exported
from sdd_train.eval.export import main as export_main
from sdd_train.diagnostics.summary import read_records

EXTRA = ["optim.warmup_steps=3", "model.block=sdd", "train.precision=fp32", "train.eval_interval=0",
         "train.max_steps=10", "train.checkpoint_interval=5"]


def run(run_dir: Path, cache: Path, *extra: str) -> int:
    return main(small_run(run_dir, cache, *EXTRA, *extra))


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_records(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def reference(data_cache, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    assert run(run_dir, data_cache) == 0
    return run_dir


def test_a_failed_save_keeps_previous_checkpoint(reference, data_cache, tmp_path, monkeypatch, capsys):
    """The shards of step 10 are written, then the save fails: the run stops with exit 1 and one line,
    the half-written checkpoint is gone, step 5's stays the latest, and re-running finishes exactly
    like the reference. (Full disks and kills: tests/test_faults.py.)"""
    real_save, calls = storage.dcp.save, []

    def fail_on_second_save(*args, **kwargs):
        calls.append(1)
        real_save(*args, **kwargs)  # the shards are on disk ...
        if len(calls) == 2:
            raise OSError("disk vanished")  # ... but the checkpoint was never finalised

    monkeypatch.setattr(storage.dcp, "save", fail_on_second_save)
    assert run(tmp_path, data_cache) == 1
    err = capsys.readouterr().err.strip()
    assert "checkpoint of step 10 not saved" in err and "disk vanished" in err and len(err.splitlines()) == 1
    monkeypatch.undo()
    assert checkpoint.latest(tmp_path).name == "step_0000005"
    assert not list(checkpoint.checkpoint_dir(tmp_path).glob("*.partial"))
    assert run(tmp_path, data_cache) == 0  # resumes from step 5 and finishes exactly like the reference
    assert losses(tmp_path) == losses(reference)


def test_retention_keeps_last_n_plus_permanent(data_cache, tmp_path):
    assert run(tmp_path, data_cache, "train.checkpoint_interval=2", "train.keep_checkpoints=1",
               "train.permanent_checkpoint_interval=4") == 0
    kept = sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).glob("step_*"))
    assert kept == ["step_0000004", "step_0000008", "step_0000010"]
    assert (checkpoint.checkpoint_dir(tmp_path) / "latest").read_text() == "step_0000010"


def test_async_checkpoints_equal_sync_ones(reference, data_cache, tmp_path):
    assert run(tmp_path, data_cache, "train.async_checkpoint=true") == 0
    assert losses(tmp_path) == losses(reference)
    for step in (5, 10):
        name = f"step_{step:07d}"
        a = checkpoint.read_model_state(checkpoint.checkpoint_dir(tmp_path) / name)
        b = checkpoint.read_model_state(checkpoint.checkpoint_dir(reference) / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), step  # staged before training moved on


def test_export_consolidated_safetensors(reference, tmp_path, capsys):
    out = export(reference, tmp_path / "export")
    model = load_exported(out)
    state = checkpoint.read_model_state(checkpoint.latest(reference))
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    tokens = torch.randint(0, 512, (2, 16))
    assert torch.isfinite(model(tokens)).all()
    assert export_main([str(tmp_path / "no_such_run")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


PLAIN_LOSS = "train.loss_chunk_size=0"


class NaNAt:
    """Wraps the model's lm_loss so that the given training forwards return NaN (a planted bad
    batch); the runs pass PLAIN_LOSS so the model computes its loss through lm_loss. Validation
    (no grad) passes through uncounted."""

    def __init__(self, calls: set[int] | None = None, from_call: int | None = None):
        self.calls, self.from_call, self.n = calls or set(), from_call, 0
        self.real = transformer.lm_loss

    def __call__(self, logits, targets, z=0.0):
        loss, ce, zl = self.real(logits, targets, z)
        if not torch.is_grad_enabled():
            return loss, ce, zl
        self.n += 1
        if self.n in self.calls or (self.from_call is not None and self.n >= self.from_call):
            nan = torch.tensor(float("nan"))
            return loss * nan, ce * nan, zl
        return loss, ce, zl


def test_nonfinite_step_is_skipped_and_counted(data_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(transformer, "lm_loss", NaNAt(calls={5}))  # step 3's first micro-batch (2 per step)
    assert run(tmp_path, data_cache, PLAIN_LOSS, "train.nonfinite=skip") == 0
    records = [r for r in read_records(tmp_path / "metrics.jsonl") if "loss" in r]
    skipped = [r for r in records if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3]
    assert records[-1]["skipped_steps"] == 1
    assert checkpoint.read_meta(checkpoint.latest(tmp_path))["callbacks"]["stability"]["skipped_steps"] == 1
    state = checkpoint.read_model_state(checkpoint.latest(tmp_path))
    assert all(torch.isfinite(v).all() for v in state.values())


def test_too_many_consecutive_nonfinite_steps_stop(data_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(transformer, "lm_loss", NaNAt(from_call=5))
    assert run(tmp_path, data_cache, PLAIN_LOSS, "train.nonfinite=skip", "train.max_nonfinite_skips=3",
               "train.checkpoint_interval=1") == 3
    assert "3 consecutive non-finite steps" in capsys.readouterr().err
    meta = checkpoint.read_meta(checkpoint.latest(tmp_path))
    # the run stops at step 5, before saving it
    assert (meta["step"], meta["callbacks"]["stability"]["skipped_steps"]) == (4, 2)


def test_nonfinite_stop_is_the_default(data_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(transformer, "lm_loss", NaNAt(calls={5}))
    assert run(tmp_path, data_cache, PLAIN_LOSS) == 3
    assert "train.nonfinite=skip" in capsys.readouterr().err


def _snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")}


def test_a_branch_from_another_runs_checkpoint_continues_it_exactly(reference, data_cache, tmp_path):
    """``train.init_from``: a new run started from the reference's step-5 checkpoint with the same
    config trains steps 6-10 bitwise as the reference did (weights, optimizer state, step and data
    position taken over); the reference's files are only read; a re-run resumes from the branch's
    own checkpoint, not from init_from again."""
    before = _snapshot(reference)
    start = checkpoint.checkpoint_dir(reference) / "step_0000005"
    assert run(tmp_path, data_cache, f"train.init_from={start}") == 0
    want = {step: loss for step, loss in losses(reference).items() if step > 5}
    assert losses(tmp_path) == want
    assert _snapshot(reference) == before
    events = read_records(tmp_path / "events.jsonl")
    assert [e["from_step"] for e in events if e["event"] == "branched"] == [5]
    assert run(tmp_path, data_cache, f"train.init_from={start}", "train.max_steps=12") == 0
    assert sorted(losses(tmp_path)) == list(range(6, 13))  # steps 11-12 appended after step 10's checkpoint


def test_a_decay_branch_follows_its_own_schedule(reference, data_cache, tmp_path):
    """A WSD cooldown branched off step 5: from step 6 on, the learning rate is the branch's schedule's."""
    from sdd_train.config import load_config
    from conftest import TINY, SMALL_RUN
    from sdd_train.train.schedules import lr_at

    start = checkpoint.checkpoint_dir(reference) / "step_0000005"
    branch = ["optim.schedule=wsd", "optim.decay_steps=4", "optim.decay_shape=1-sqrt", "train.max_steps=9"]
    assert run(tmp_path, data_cache, f"train.init_from={start}", *branch) == 0
    cfg = load_config(TINY, [*SMALL_RUN, *EXTRA, *branch])
    lrs = {r["step"]: r["lr"] for r in read_records(tmp_path / "metrics.jsonl") if "lr" in r}
    tokens = cfg.train.global_batch_size * cfg.train.seq_len
    assert lrs == {s: lr_at(s - 1, cfg.optim, 9, tokens) for s in range(6, 10)}
    assert lrs[6] > lrs[7] > lrs[8] > lrs[9] == pytest.approx(cfg.optim.alpha_f * cfg.optim.lr)


def test_a_branch_from_a_checkpoint_that_is_not_one_writes_nothing(reference, data_cache, tmp_path, capsys):
    """A missing checkpoint, or one of the run itself, is refused before anything is written."""
    run_dir, before = tmp_path / "branch", _snapshot(reference)
    cases = [(run_dir, tmp_path / "nowhere" / "step_0000005", "is not a complete checkpoint"),
             (reference, checkpoint.checkpoint_dir(reference) / "step_0000005", "in this run's own directory")]
    for target, start, needle in cases:
        assert run(target, data_cache, f"train.init_from={start}") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("config error: train.init_from:") and needle in err and len(err.splitlines()) == 1, err
    assert not run_dir.exists() and _snapshot(reference) == before


def test_another_optimizer_does_not_continue_a_checkpoint(reference, data_cache, tmp_path, capsys):
    """AdamW's moments are not Muon's momentum: a resume or a branch that switches optim.name stops with
    one line naming the key, before anything is written."""
    run_dir, before = tmp_path / "copy", _snapshot(reference)
    shutil.copytree(reference, run_dir)
    start = checkpoint.checkpoint_dir(reference) / "step_0000005"
    for target, extra in ((run_dir, ["train.max_steps=12"]), (tmp_path / "branch", [f"train.init_from={start}"])):
        assert run(target, data_cache, "optim.name=muon", *extra) == 2
        err = capsys.readouterr().err.strip()
        assert "holds adamw's optimizer state and this run sets optim.name=muon" in err, err
        assert len(err.splitlines()) == 1
    assert not (tmp_path / "branch").exists() and _snapshot(reference) == before
    assert max(losses(run_dir)) == 10


def test_a_sub_config_neither_model_uses_is_not_a_model_change(tmp_path):
    """A dense model's model.moe.* computes nothing: a changed MoE default must not stop its resume (the
    router z-loss default changed on 2026-12-03); for an MoE model on either side it is a change."""
    import json
    from sdd_train.config import as_dict, load_config
    from conftest import TINY

    here = as_dict(load_config(TINY))["model"]
    written = json.loads(json.dumps(here))
    written["moe"]["z_loss_weight"], written["spannorm"]["residual_scale"] = 0.001, 0.5
    ckpt = tmp_path / "step_0000001"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"config": {"model": written}}))
    assert checkpoint.model_changes(ckpt, here) == []
    moe = {**here, "ffn": "moe"}
    assert checkpoint.model_changes(ckpt, moe) == ["model.ffn: 'dense' -> 'moe'", "model.moe.z_loss_weight: 0.001 -> None"]
    written["block"] = "spannorm"
    (ckpt / "meta.json").write_text(json.dumps({"config": {"model": written}}))
    assert "model.spannorm.residual_scale: 0.5 -> 1.0" in checkpoint.model_changes(ckpt, here)
