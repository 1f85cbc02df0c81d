"""The sbatch scripts and sdd-sweep's arrays on a real Slurm: the one-node cluster of
scripts/slurm/local_cluster.sh, through ``make slurm-test`` (which sets SDD_TRAIN_SLURM_TESTS=1).
Elsewhere these tests are skipped: they submit jobs that take minutes.

A job is told it has no GPUs and how many processes to start as a CPU cluster user would tell it
(``--gpus-per-node=0 --cpus-per-task=2 --export=ALL,NPROC_PER_NODE=2``). Slurm holds a requeued
batch job for about two minutes before it may start again (its EligibleTime); the tests release it at
once (``scontrol update StartTime=now``), as a cluster with free nodes would run it."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import SMALL_RUN, TINY
from sdd_train import checkpoint
from sdd_train.diagnostics.summary import read_records

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts" / "slurm"
BIN = Path(sys.executable).parent  # the venv's torchrun, python
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=2", "--export=ALL,NPROC_PER_NODE=2"]
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("SDD_TRAIN_SLURM_TESTS") != "1",
                       reason="needs a Slurm: make slurm-test (scripts/slurm/local_cluster.sh start)"),
]


def slurm(*args: str, check: bool = True) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, env=ENV, timeout=60)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def sbatch(*args: str) -> str:
    return slurm("sbatch", "--parsable", *args).strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Reason, Restarts, ...); {} once Slurm forgot the job."""
    out = slurm("scontrol", "-o", "show", "job", job, check=False)
    return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}


def release_if_held(job: str, info: dict[str, str]) -> None:
    """A requeued job waits for its EligibleTime (about two minutes): let it start now."""
    if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
        slurm("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)


def wait_for_end(job: str, timeout: float) -> dict[str, str]:
    """Wait until the job (and every requeue of it) ended; its last ``job_info``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        if info.get("JobState") in FINAL:
            return info
        release_if_held(job, info)
        time.sleep(1)
    slurm("scancel", job, check=False)
    raise AssertionError(f"job {job} still {job_info(job).get('JobState')} after {timeout:.0f} s")


def wait_for_step(run_dir: Path, step: int, job: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [r["step"] for r in read_records(run_dir / "metrics.jsonl") if "loss" in r] \
            if (run_dir / "metrics.jsonl").is_file() else []
        if steps and steps[-1] >= step:
            return
        assert job_info(job).get("JobState") not in FINAL, f"job {job} ended before step {step}"
        time.sleep(0.5)
    raise AssertionError(f"{run_dir} did not reach step {step} in {timeout:.0f} s")


def run_args(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [TINY, *SMALL_RUN, "train.precision=fp32", f"data.cache_dir={cache}", f"run_dir={run_dir}",
            "train.eval_interval=0", "diagnostics.activation_interval=0", *extra]


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_records(run_dir / "metrics.jsonl") if "loss" in r}


def assert_same_run(run_dir: Path, ref_dir: Path, steps: int) -> None:
    """Every step's loss and gradient norm, and the final weights, bitwise equal."""
    got, want = losses(run_dir), losses(ref_dir)
    assert sorted(want) == list(range(1, steps + 1)) and got == want
    a, b = (checkpoint.read_model_state(checkpoint.latest(d)) for d in (run_dir, ref_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm_cache")


@pytest.fixture
def workdir(tmp_path) -> Path:
    (tmp_path / "logs").mkdir()  # the scripts' --output=logs/%x-%j.out: Slurm does not create folders
    return tmp_path


def torchrun_reference(run_dir: Path, args: list[str]) -> None:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "sdd_train.train", *args]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


# Long enough (about 3 minutes on 2 CPU cores) for the time limit's warning to interrupt it twice.
PREEMPTED_STEPS = 2000


def test_a_time_limited_job_is_preempted_requeued_and_matches_torchrun_bitwise(workdir, cache):
    """--time=2 with the warning 60 s before the end: SIGUSR1 reaches the workers, they checkpoint and exit,
    the script requeues the job, it resumes; again and again until the run is done. Every step and the
    final weights equal the same command's under torchrun without interruption, and the log holds every
    segment's output."""
    extra = [f"train.max_steps={PREEMPTED_STEPS}", "train.log_interval=1", "train.checkpoint_interval=1000"]
    torchrun_reference(workdir / "ref", run_args(workdir / "ref", cache, *extra))
    job = sbatch(f"--chdir={workdir}", "--time=2", "--signal=B:USR1@60", *CPU_JOB,
                 str(SCRIPTS / "single_node.sbatch"), *run_args(workdir / "run", cache, *extra))
    info = wait_for_end(job, timeout=1200)
    assert info["JobState"] == "COMPLETED", info
    restarts = int(info["Restarts"])
    assert restarts >= 2, f"preempted {restarts} times; the run is too short for this machine"
    assert_same_run(workdir / "run", workdir / "ref", PREEMPTED_STEPS)
    log = (workdir / "logs" / f"sdd_train-{job}.out").read_text()
    assert [int(n) for n in re.findall(r"\(restart (\d+)\)", log)] == list(range(restarts + 1))
    assert len(re.findall(r"stopped by SIGUSR1 at step \d+", log)) == restarts
    assert log.count("preemption signal:") == restarts and log.count("resume: from") == restarts
    assert "run directory:" in log


def test_scancel_of_a_running_job_leaves_a_loadable_checkpoint(workdir, cache):
    run_dir = workdir / "run"
    job = sbatch(f"--chdir={workdir}", "--time=10", *CPU_JOB, str(SCRIPTS / "single_node.sbatch"),
                 *run_args(run_dir, cache, "train.max_steps=100000", "train.checkpoint_interval=20"))
    wait_for_step(run_dir, 25, job)
    slurm("scancel", job)
    info = wait_for_end(job, timeout=120)
    assert info["JobState"] == "CANCELLED", info
    latest = checkpoint.latest(run_dir)
    assert latest is not None and checkpoint.read_model_state(latest)
    verify = subprocess.run([sys.executable, "-m", "sdd_train.checkpoint", "verify", str(run_dir)],
                            env=ENV, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_the_multi_node_script_on_one_node_rendezvouses_and_requeues(workdir, cache):
    """One node, two processes, c10d rendezvous on the node; a preemption warning (sent by hand here:
    the same SIGUSR1 to the batch shell as the time limit's) reaches the workers through srun --overlap,
    and the requeued job resumes and finishes bitwise as torchrun alone does."""
    extra = ["train.max_steps=300", "train.log_interval=1", "train.checkpoint_interval=1000"]
    torchrun_reference(workdir / "ref", run_args(workdir / "ref", cache, *extra))
    job = sbatch(f"--chdir={workdir}", "--nodes=1", "--time=10", *CPU_JOB,
                 "--export=ALL,NPROC_PER_NODE=2,MASTER_PORT=29517",
                 str(SCRIPTS / "multi_node.sbatch"), *run_args(workdir / "run", cache, *extra))
    wait_for_step(workdir / "run", 20, job)
    slurm("scancel", "--batch", "--signal=USR1", job)
    info = wait_for_end(job, timeout=600)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert_same_run(workdir / "run", workdir / "ref", 300)
    log = (workdir / "logs" / f"sdd_train-{job}.out").read_text()
    assert "(restart 0)" in log and "(restart 1)" in log and "stopped by SIGUSR1" in log


def test_a_sweep_runs_as_an_array_with_one_task_preempted_and_is_reported(workdir, cache):
    out = workdir / "sweep"
    spec = {"name": "arr", "base": TINY, "out": str(out),
            "overrides": [*SMALL_RUN, "train.precision=fp32", f"data.cache_dir={cache}", "train.max_steps=200",
                          "train.eval_interval=100", "diagnostics.activation_interval=0", "train.log_interval=10"],
            "axes": [{"name": "block", "key": "model.block", "values": ["pre", "sdd", "post"]}]}
    path = workdir / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    submitted = subprocess.run([sys.executable, "-m", "sdd_train.sweeps.launch", "slurm", str(path), "--submit",
                                "--sbatch=--cpus-per-task=1", "--sbatch=--time=10"],
                               cwd=workdir, env=ENV, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"array job (\d+)", submitted.stdout).group(1)
    first = f"{job}_0"
    wait_for_step(out / "pre", 20, first)
    slurm("scancel", "--batch", "--signal=USR1", first)
    for task in range(3):
        info = wait_for_end(f"{job}_{task}", timeout=600)
        assert info["JobState"] == "COMPLETED", info
        assert info["Restarts"] == ("1" if task == 0 else "0"), info
    log = (out / f"slurm-{job}_0.out").read_text()
    assert log.count("starts on") == 2 and "stopped by SIGUSR1" in log
    report = subprocess.run([sys.executable, "-m", "sdd_train.diagnostics.report", str(out)],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    table = (out / "results.md").read_text()
    for name in ("pre", "sdd", "post"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert "| 0 | 200 |" in row, row  # exit 0 after 200 steps
    assert all(math.isfinite(v[0]) for v in losses(out / "pre").values())
    shutil.rmtree(out / "report", ignore_errors=True)
