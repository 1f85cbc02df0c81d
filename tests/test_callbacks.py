"""Callbacks from the config by import path: docs/callbacks.md's example runs, keeps its state across a
resume, and a bad path or option stops the run before anything is written."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from conftest import small_run
from sdd_train.checkpoint import latest, read_meta
from sdd_train.diagnostics.summary import read_records
from sdd_train.train.__main__ import main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "callbacks.md"


@pytest.fixture
def example_module(tmp_path, monkeypatch) -> str:
    """docs/callbacks.md's example, as the module a user would write."""
    code = re.search(r"```python\n(# my_callbacks.py\n.*?)```", DOCS.read_text(), re.S).group(1)
    (tmp_path / "my_callbacks.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_callbacks"
    sys.modules.pop("my_callbacks", None)


def test_the_documented_example_runs_and_resumes(example_module, data_cache, tmp_path):
    spec = f"callbacks=[{{path: '{example_module}:BestValLoss', options: {{min_delta: 0.0}}}}]"
    run = tmp_path / "run"
    common = ["train.eval_interval=2", "train.checkpoint_interval=2", "train.precision=fp32", spec]
    assert main(small_run(run, data_cache, "train.max_steps=4", *common)) == 0
    records = read_records(run / "metrics.jsonl")
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    best_step = min(val, key=val.get)
    assert [r["best_val_step"] for r in records if r["step"] == 4 and "loss" in r] == [2]  # val at 4 comes after
    state = read_meta(latest(run))["callbacks"]["best_val_loss"]
    assert state == {"best": val[best_step], "best_step": best_step}
    # resumed, the callback continues from its checkpointed state
    assert main(small_run(run, data_cache, "train.max_steps=5", *common)) == 0
    step5 = [r for r in read_records(run / "metrics.jsonl") if r["step"] == 5 and "loss" in r][0]
    assert (step5["best_val_loss"], step5["best_val_step"]) == (val[best_step], best_step)


@pytest.mark.parametrize("spec,needle", [
    ("callbacks=[{path: 'no_such_module:Cb'}]", "callbacks.0.path: cannot import 'no_such_module:Cb'"),
    ("callbacks=[{path: 'sdd_train.config:RunConfig'}]", "is not a subclass of"),
    ("callbacks=[{path: 'my_callbacks:BestValLoss', options: {patience: 3}}]", "callbacks.0.options"),
    ("callbacks=[{path: nodots}]", "callbacks.0.path"),
])
def test_a_bad_callback_is_a_config_error_before_anything_is_written(spec, needle, example_module, data_cache,
                                                                      tmp_path, capsys):
    run = tmp_path / "run"
    assert main(small_run(run, data_cache, "train.max_steps=2", spec)) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


ROLLBACK_MODULE = '''
from sdd_train.train.callbacks import Action, Callback, Verdict


class Vetoes(Callback):
    """Asks once, at step 3, for a rollback that leaves that step's batch out; records what it saw."""

    name = "vetoes"
    priority = 95

    def __init__(self):
        self.voted, self.in_vote, self.seen = False, False, []

    def step_action(self, trainer, step, out):
        self.in_vote = True
        try:
            if step == 3 and not self.voted:
                self.voted = True  # not state: the checkpoint's state does not undo the vote
                return Verdict(Action.ROLLBACK, frozenset({trainer.position}))
            return None
        finally:
            self.in_vote = False

    def on_rollback(self, trainer, step):
        self.seen.append(("rollback", step, sorted(trainer.excluded)))

    def load_state_dict(self, state):
        assert not self.in_vote, "state reloaded inside the callback's own vote"
        self.seen.append(("load", state.get("steps")))

    def state_dict(self):
        return {"steps": len(self.seen)}
'''


def test_callbacks_run_by_priority(tmp_path, monkeypatch):
    """The order comes from each callback's priority (ties keep the built-in order), not from a list."""
    from sdd_train.config import load_config
    from sdd_train.train.callbacks import build_callbacks
    (tmp_path / "vetoes.py").write_text(ROLLBACK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml",
                      ["callbacks=[{path: 'vetoes:Vetoes'}]", "diagnostics.layer_stats_interval=5",
                       "diagnostics.activation_interval=5", "train.eval_interval=5"])
    names = [c.name for c in build_callbacks(cfg)]
    sys.modules.pop("vetoes", None)
    assert names == ["stability", "vetoes", "layer_stats", "speed", "evaluation", "activations", "checkpointing",
                     "run_log"]


def test_a_rollback_vote_is_carried_out_by_the_loop_after_the_vote(tmp_path, data_cache, monkeypatch):
    """A callback votes for a rollback and names the batch to leave out; the loop reloads the checkpoint
    after every callback has voted (never inside the callback's own hook), leaves the batch out, and
    tells every callback with ``on_rollback``."""
    (tmp_path / "vetoes.py").write_text(ROLLBACK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        run = tmp_path / "run"
        captured = {}
        from sdd_train.train import trainer as trainer_module
        real_fit = trainer_module.Trainer.fit

        def fit(self):
            captured["trainer"] = self
            return real_fit(self)

        monkeypatch.setattr(trainer_module.Trainer, "fit", fit)
        assert main(small_run(run, data_cache, "train.max_steps=4", "train.checkpoint_interval=2",
                              "train.precision=fp32", "callbacks=[{path: 'vetoes:Vetoes'}]")) == 0
        trainer = captured["trainer"]
        vetoes = next(c for c in trainer.callbacks if c.name == "vetoes")
        gbs = trainer.cfg.train.global_batch_size
        assert ("rollback", 2, [2 * gbs]) in vetoes.seen  # step 3 read the stream's third global batch
        assert sorted(trainer.excluded) == [2 * gbs] and trainer.step == 4 and trainer.position == 5 * gbs
        assert read_meta(latest(run))["data"]["skipped_positions"] == [2 * gbs]
    finally:
        sys.modules.pop("vetoes", None)
