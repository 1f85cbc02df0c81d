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
