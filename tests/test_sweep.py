"""Sweeps: grid expansion, '*=' overrides, a diverging run, the results table, the Slurm array script."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import SMALL_RUN, TINY
from sdd_train.config import ConfigError
from sdd_train.diagnostics.summary import EXIT_FILE, read_records
from sdd_train.sweeps.grid import load_sweep
from sdd_train.sweeps.launch import StopForwarder, main


def write_sweep(tmp_path: Path, cache: Path, axes: list, overrides_extra: tuple[str, ...] = (), **extra) -> Path:
    spec = {"name": "t", "base": TINY, "out": str(tmp_path / "out"),
            "overrides": [*SMALL_RUN, f"data.cache_dir={cache}", "train.max_steps=6", "train.eval_interval=0",
                          "diagnostics.activation_interval=0", *overrides_extra],
            "axes": axes, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_grid_and_multiplicative_overrides(tmp_path, data_cache):
    path = write_sweep(tmp_path, data_cache, [
        {"name": "block", "key": "model.block", "values": ["pre", "sdd"]},
        {"name": "p", "values": {"base": [], "lr_x5": ["optim.lr*=5"], "deep": ["model.n_layers*=2"]}},
    ])
    sweep = load_sweep(path)
    assert [r.name for r in sweep.runs] == ["pre-base", "pre-lr_x5", "pre-deep", "sdd-base", "sdd-lr_x5", "sdd-deep"]
    run = sweep.runs[1]
    assert run.labels == {"block": "pre", "p": "lr_x5"}
    assert "optim.lr=0.015" in run.overrides  # 5 x the 3e-3 of SMALL_RUN, not of the base file
    assert "model.n_layers=4" in sweep.runs[2].overrides  # ints stay ints
    assert run.run_dir == str(tmp_path / "out" / "pre-lr_x5")


@pytest.mark.parametrize("axes, message", [
    ([{"name": "b", "values": ["pre"]}], "axes.0.key"),
    ([{"name": "b", "key": "model.block", "values": ["nope"]}], "model.block"),
    ([{"name": "p", "values": {"x": ["model.init.std*=2"]}}], "model.init.std"),  # null cannot be multiplied
    ([{"name": "p", "values": {"x": ["optim.lr*=two"]}}], "factor"),
])
def test_bad_sweeps_are_rejected_before_anything_runs(tmp_path, data_cache, axes, message, capsys):
    path = write_sweep(tmp_path, data_cache, axes)
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)
    assert main(["run", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sweep_with_a_diverging_run_completes_and_marks_it(tmp_path, data_cache):
    path = write_sweep(tmp_path, data_cache, [{"name": "setting", "values": {
        "ok": [],
        "explode": ["model.block=post", "optim.lr=1e6", "optim.warmup_steps=0", "optim.grad_clip=0"],
    }}])
    assert main(["run", str(path)]) == 0
    out = tmp_path / "out"
    rows = {r["run"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert rows["ok"]["diverged"] == "False" and rows["ok"]["exit"] == "0" and rows["ok"]["steps"] == "6"
    assert float(rows["ok"]["final_loss"]) < 6.3
    assert rows["explode"]["diverged"] == "True" and rows["explode"]["exit"] == "3"
    assert 1 <= int(rows["explode"]["diverged_at"]) <= 6
    table = (out / "results.md").read_text()
    assert "| explode | explode | 3 |" in table
    # a re-run skips both finished runs (the diverged one is not retried)
    before = (out / "ok" / "metrics.jsonl").read_text()
    assert main(["run", str(path)]) == 0
    assert (out / "ok" / "metrics.jsonl").read_text() == before


def test_diverge_loss_threshold_marks_a_run_that_never_learned(tmp_path, data_cache):
    path = write_sweep(tmp_path, data_cache, [{"name": "lr", "key": "optim.lr", "values": [1e-9]}], diverge_loss=5.0)
    assert main(["run", str(path)]) == 0
    (row,) = csv.DictReader((tmp_path / "out" / "results.csv").open())
    assert row["exit"] == "0" and row["diverged"] == "True" and row["diverged_at"] == "1"


def test_slurm_array_script(tmp_path, data_cache):
    path = write_sweep(tmp_path, data_cache, [{"name": "block", "key": "model.block", "values": ["pre", "sdd", "post"]}])
    assert main(["slurm", str(path), "--nproc", "4", "--sbatch=--partition=gpu"]) == 0
    script = (tmp_path / "out" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --gpus-per-task=4" in script
    assert '--index "$SLURM_ARRAY_TASK_ID" --nproc 4' in script
    # preemptible: every segment appended to the log, SIGUSR1 before the limit, requeued (tests/test_slurm.py)
    assert "#SBATCH --open-mode=append" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --signal=B:USR1@120" in script and "trap requeue USR1" in script
    manifest = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [r["name"] for r in manifest["runs"]] == ["pre", "sdd", "post"]
    assert main(["run", str(path), "--index", "3"]) == 2  # out of range


def test_a_preempted_run_is_not_recorded_as_finished_and_resumes(tmp_path, data_cache):
    """SIGUSR1 to ``sdd-sweep run`` (a Slurm array task's preemption warning) reaches the training process,
    which checkpoints and exits 0; that exit must not mark the run finished, or the requeued task would
    skip it. The re-run resumes it and finishes."""
    path = write_sweep(tmp_path, data_cache, [{"name": "block", "key": "model.block", "values": ["sdd"]}],
                       overrides_extra=["train.max_steps=60", "train.checkpoint_interval=1000", "train.precision=fp32"])
    run_dir = tmp_path / "out" / "sdd"
    cmd = [sys.executable, "-m", "sdd_train.sweeps.launch", "run", str(path), "--no-table"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").is_file() or not read_records(run_dir / "metrics.jsonl"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "stopped by SIGUSR1" in output, output[-3000:]
    stopped_at = read_records(run_dir / "metrics.jsonl")[-1]["step"]
    assert stopped_at < 60 and not (run_dir / EXIT_FILE).exists()
    assert main(["run", str(path), "--no-table"]) == 0
    assert read_records(run_dir / "metrics.jsonl")[-1]["step"] == 60
    assert (run_dir / EXIT_FILE).read_text() == "0\n"


def test_a_stop_signal_reaches_torchruns_workers_not_torchrun(tmp_path):
    """With --nproc > 1 the run is torchrun, which SIGUSR1 would kill: the signal goes to its children (the
    workers, as tests/test_distributed.py checks torchrun's are). A stand-in parent with two children
    that record the signal, and that dies of SIGUSR1 itself, checks where it goes."""
    child = ("import signal, sys, time, pathlib; f = pathlib.Path(sys.argv[1])"
             "; signal.signal(signal.SIGUSR1, lambda *a: f.write_text('USR1')); f.write_text('ready')"
             "; [time.sleep(0.02) for _ in range(500) if f.read_text() != 'USR1']")
    parent = (f"import subprocess, sys; ps = [subprocess.Popen([sys.executable, '-c', {child!r}, p])"
              " for p in sys.argv[1:]]; [p.wait() for p in ps]")
    files = [tmp_path / "w0", tmp_path / "w1"]
    proc = subprocess.Popen([sys.executable, "-c", parent, *map(str, files)])
    deadline = time.monotonic() + 60
    while not all(f.is_file() and f.read_text() == "ready" for f in files):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    forwarder = StopForwarder(proc, torchrun=True)
    forwarder._forward(signal.SIGUSR1, None)
    assert proc.wait(timeout=30) == 0  # the parent was not signalled; its children ended on theirs
    assert [f.read_text() for f in files] == ["USR1", "USR1"] and forwarder.received == signal.SIGUSR1
