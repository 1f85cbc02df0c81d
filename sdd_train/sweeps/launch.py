"""Ablation sweeps: one YAML describes a grid of runs; run it locally, as a Slurm array, tabulate it.

A sweep file::

    name: robustness
    base: ../tiny.yaml            # the run config every run starts from (relative to this file)
    out: runs/sweeps/robustness   # optional; default runs/sweeps/<name>
    overrides: [train.max_steps=300]   # for every run
    diverge_loss: 7.0             # optional: a run whose loss ends above this counts as diverged
    axes:                         # the grid is the product of the axes, in this order
      - name: block
        key: model.block          # a config key with a list of values ...
        values: [pre, post, sdd]
      - name: perturbation        # ... or named points, each a list of overrides
        values:
          base: []
          lr_x5: [optim.lr*=5]    # key*=factor multiplies the value the run would otherwise have
          no_warmup: [optim.warmup_steps=0]

``sdd-sweep run FILE`` trains every run in sequence (each in its own process, so a diverging run
stops only itself) and writes ``results.md`` / ``results.csv``; ``sdd-sweep slurm FILE`` writes
an sbatch array script with one task per run (``--submit`` also submits it); ``sdd-sweep table FILE``
rebuilds the table. Re-running skips finished and diverged runs and resumes the others.

SIGUSR1 or SIGTERM to ``sdd-sweep run`` (Slurm's preemption warning, ``scancel``) reaches the
training processes: the run checkpoints and stops, and is not recorded as finished, so the requeued
array task (or a re-run) resumes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from sdd_train.diagnostics.summary import EXIT_FILE, write_table
from sdd_train.exit_codes import EXIT_DIVERGED, UsageError, report_usage_error
from sdd_train.sweeps.grid import Run, Sweep, load_sweep
from sdd_train.train.stop_signals import STOP_SIGNALS


def train_command(sweep: Sweep, run: Run, nproc: int) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"] \
        if nproc > 1 else [sys.executable, "-m"]
    return [*launcher, "sdd_train.train", str(sweep.base), *run.overrides]


def write_manifest(sweep: Sweep) -> None:
    sweep.out.mkdir(parents=True, exist_ok=True)
    manifest = {"name": sweep.name, "base": str(sweep.base), "diverge_loss": sweep.diverge_loss,
                "axes": [{"name": a.name, "key": a.key} for a in sweep.axes], "runs": [asdict(r) for r in sweep.runs]}
    (sweep.out / "sweep.json").write_text(json.dumps(manifest, indent=1))


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (torchrun's: the training workers), from /proc: those of each of its
    threads, whichever thread started them."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread (or the process) ended meanwhile
            continue
    return children


class StopForwarder:
    """While a run trains, SIGTERM/SIGUSR1 to this process go to the training processes: to the trainer
    itself, or to torchrun's workers (SIGUSR1 would kill torchrun). ``received`` tells the caller that
    the run's exit 0 means "checkpointed and stopped", not "finished"."""

    def __init__(self, proc: subprocess.Popen, torchrun: bool):
        self.proc, self.torchrun, self.received = proc, torchrun, 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopForwarder:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _forward(self, signum: int, frame) -> None:
        self.received = signum
        for pid in _children(self.proc.pid) if self.torchrun else [self.proc.pid]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def run_one(sweep: Sweep, run: Run, nproc: int = 1) -> int | None:
    """Train one run (resuming it if it was interrupted); returns and records its exit code, or returns
    None (recording nothing) when a stop signal ended it early with a checkpoint to resume from."""
    run_dir = Path(run.run_dir)
    exit_file = run_dir / EXIT_FILE
    if exit_file.is_file() and int(exit_file.read_text()) in (0, EXIT_DIVERGED):
        print(f"sweep: {run.name}: already finished (exit {exit_file.read_text().strip()})", flush=True)
        return int(exit_file.read_text())
    cmd = train_command(sweep, run, nproc)
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd)
    with StopForwarder(proc, torchrun=nproc > 1) as stops:
        code = proc.wait()
    if stops.received and code == 0:
        print(f"sweep: {run.name}: stopped by {signal.Signals(stops.received).name} after a checkpoint;"
              " re-run (or requeue) to resume it", flush=True)
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    exit_file.write_text(f"{code}\n")
    return code


def write_slurm(sweep: Sweep, nproc: int, sbatch_args: list[str], sweep_file: Path) -> Path:
    """An sbatch array script: task i runs ``sdd-sweep run FILE --index i``. Preemptible as the sbatch
    scripts in scripts/slurm are: SIGUSR1 120 s before the time limit makes the run checkpoint, then
    the task requeues itself; every segment's output is appended to the task's log."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name=sweep-{sweep.name}", f"#SBATCH --array=0-{len(sweep.runs) - 1}",
             "#SBATCH --nodes=1", "#SBATCH --ntasks=1", f"#SBATCH --output={sweep.out.resolve()}/slurm-%A_%a.out",
             "#SBATCH --open-mode=append", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120"]
    if nproc > 1:
        lines.append(f"#SBATCH --gpus-per-task={nproc}")
    lines += [f"#SBATCH {a}" for a in sbatch_args]
    lines += ["set -euo pipefail", f"cd {shlex.quote(os.getcwd())}",
              "echo \"array task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} (job $SLURM_JOB_ID) starts on"
              " $(hostname) at $(date -Is)\"",
              "requeue() {",
              "    echo \"preemption signal: the run checkpoints, then job $SLURM_JOB_ID is requeued\"",
              "    kill -USR1 \"$SWEEP_PID\" || true",
              "    wait \"$SWEEP_PID\" || true",
              "    scontrol requeue \"$SLURM_JOB_ID\"",
              "}",
              "trap requeue USR1",
              f"{shlex.quote(sys.executable)} -m sdd_train.sweeps.launch run {shlex.quote(str(sweep_file))}"
              f" --index \"$SLURM_ARRAY_TASK_ID\" --nproc {nproc} --no-table &",
              "SWEEP_PID=$!",
              "wait \"$SWEEP_PID\""]
    script = sweep.out / "sweep.sbatch"
    script.write_text("\n".join(lines) + "\n")
    return script


def submit(script: Path) -> str:
    """``sbatch`` the script; returns the job id (``--parsable``)."""
    try:
        result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise UsageError("sbatch: not found; run on a Slurm login node (or scripts/slurm/local_cluster.sh start),"
                         f" or submit {script} there") from None
    if result.returncode:
        raise UsageError(f"sbatch {script} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdd-sweep", description="Run a grid of training runs from a sweep YAML.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="train the runs in sequence (or one, with --index), then write the table")
    p_run.add_argument("sweep")
    p_run.add_argument("--index", type=int, help="only the run with this index (a Slurm array task)")
    p_run.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun); default 1")
    p_run.add_argument("--dry-run", action="store_true", help="list the runs and their commands")
    p_run.add_argument("--no-table", action="store_true", help="do not write results.md / results.csv")
    p_slurm = sub.add_parser("slurm", help="write an sbatch array script with one task per run")
    p_slurm.add_argument("sweep")
    p_slurm.add_argument("--nproc", type=int, default=1, help="GPUs (torchrun processes) per run")
    p_slurm.add_argument("--sbatch", action="append", default=[], metavar="ARG",
                         help="an extra #SBATCH line, e.g. --sbatch=--partition=gpu (repeatable)")
    p_slurm.add_argument("--submit", action="store_true", help="also submit it with sbatch and print the job id")
    p_table = sub.add_parser("table", help="write results.md / results.csv from the runs so far")
    p_table.add_argument("sweep")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
    except UsageError as e:
        return report_usage_error(e)
    write_manifest(sweep)
    if args.command == "slurm":
        script = write_slurm(sweep, args.nproc, args.sbatch, Path(args.sweep).resolve())
        if not args.submit:
            print(f"wrote {script} ({len(sweep.runs)} array tasks); submit with: sbatch {script}\n"
                  f"afterwards: sdd-sweep table {args.sweep}")
            return 0
        try:
            job = submit(script)
        except UsageError as e:
            return report_usage_error(e)
        print(f"submitted {script} as array job {job} ({len(sweep.runs)} tasks, squeue -j {job});"
              f" logs: {sweep.out.resolve()}/slurm-{job}_<task>.out; afterwards: sdd-sweep table {args.sweep}")
        return 0
    if args.command == "run":
        runs = sweep.runs
        if args.index is not None:
            if not 0 <= args.index < len(runs):
                return report_usage_error(UsageError(f"--index {args.index} is outside 0..{len(runs) - 1}"))
            runs = [runs[args.index]]
        for i, run in enumerate(runs):
            if args.dry_run:
                print(f"[{sweep.runs.index(run)}] {run.name}: {shlex.join(train_command(sweep, run, args.nproc))}")
                continue
            code = run_one(sweep, run, args.nproc)
            if code is None:  # stopped by a signal: the remaining runs wait for the re-run too
                return 0
            verdict = {0: "done", EXIT_DIVERGED: "diverged"}.get(code, f"failed (exit {code})")
            print(f"sweep: [{i + 1}/{len(runs)}] {run.name}: {verdict}", flush=True)
        if args.dry_run or args.no_table:
            return 0
    md, csv_path = write_table(sweep.out)
    print(md.read_text(), end="")
    print(f"wrote {md} and {csv_path}")
    return 0


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
