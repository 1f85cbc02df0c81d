"""train.profile: a trace of a few steps with the step's phases named, and nothing after them."""

from __future__ import annotations

import json

from conftest import small_run
from sdd_train.train.__main__ import main


def test_a_profiled_run_writes_a_trace_that_names_the_phases(tmp_path, data_cache, capsys):
    """Steps 3-4 traced (wait 1, warm-up 1); step 4 checkpoints, so the trace holds every phase; the
    run's metrics are those of an unprofiled run."""
    common = ["train.max_steps=5", "train.checkpoint_interval=4", "train.eval_interval=0", "train.precision=fp32",
              "train.log_interval=1"]
    assert main(small_run(tmp_path / "profiled", data_cache, *common, "train.profile.steps=2", "train.profile.wait=1",
                          "train.profile.warmup=1")) == 0
    trace = tmp_path / "profiled" / "profile" / "trace_rank0.json"
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"data", "forward", "backward", "optimizer", "checkpoint"} <= names
    # the profiler counts its own steps from 0: #2 and #3 are the run's steps 3 and 4
    assert {n for n in names if n and n.startswith("ProfilerStep#")} == {"ProfilerStep#2", "ProfilerStep#3"}
    assert "profile: steps 3-4 traced into" in capsys.readouterr().out
    assert main(small_run(tmp_path / "plain", data_cache, *common)) == 0
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for d in ("profiled", "plain")]
    assert losses[0] == losses[1] and len(losses[0]) == 5
    assert not (tmp_path / "plain" / "profile").exists()
