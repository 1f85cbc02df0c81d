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
an sbatch array script with one task per run; ``sdd-sweep table FILE`` rebuilds the table.
Re-running skips finished and diverged runs and resumes the others.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from sdd_train.diagnostics.summary import EXIT_FILE, write_table
from sdd_train.exit_codes import EXIT_DIVERGED, UsageError, report_usage_error
from sdd_train.sweeps.grid import Run, Sweep, load_sweep


def train_command(sweep: Sweep, run: Run, nproc: int) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"] \
        if nproc > 1 else [sys.executable, "-m"]
    return [*launcher, "sdd_train.train", str(sweep.base), *run.overrides]


def write_manifest(sweep: Sweep) -> None:
    sweep.out.mkdir(parents=True, exist_ok=True)
    manifest = {"name": sweep.name, "base": str(sweep.base), "diverge_loss": sweep.diverge_loss,
                "axes": [{"name": a.name, "key": a.key} for a in sweep.axes], "runs": [asdict(r) for r in sweep.runs]}
    (sweep.out / "sweep.json").write_text(json.dumps(manifest, indent=1))


def run_one(sweep: Sweep, run: Run, nproc: int = 1) -> int:
    """Train one run (resuming it if it was interrupted); returns and records its exit code."""
    run_dir = Path(run.run_dir)
    exit_file = run_dir / EXIT_FILE
    if exit_file.is_file() and int(exit_file.read_text()) in (0, EXIT_DIVERGED):
        print(f"sweep: {run.name}: already finished (exit {exit_file.read_text().strip()})", flush=True)
        return int(exit_file.read_text())
    cmd = train_command(sweep, run, nproc)
    print("$", shlex.join(cmd), flush=True)
    code = subprocess.run(cmd).returncode
    run_dir.mkdir(parents=True, exist_ok=True)
    exit_file.write_text(f"{code}\n")
    return code


def write_slurm(sweep: Sweep, nproc: int, sbatch_args: list[str], sweep_file: Path) -> Path:
    """An sbatch array script: task i runs ``sdd-sweep run FILE --index i``."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name=sweep-{sweep.name}", f"#SBATCH --array=0-{len(sweep.runs) - 1}",
             "#SBATCH --nodes=1", "#SBATCH --ntasks=1", f"#SBATCH --output={sweep.out.resolve()}/slurm-%A_%a.out"]
    if nproc > 1:
        lines.append(f"#SBATCH --gpus-per-task={nproc}")
    lines += [f"#SBATCH {a}" for a in sbatch_args]
    lines += ["set -euo pipefail", f"cd {shlex.quote(os.getcwd())}",
              f"{shlex.quote(sys.executable)} -m sdd_train.sweeps.launch run {shlex.quote(str(sweep_file))}"
              f" --index \"$SLURM_ARRAY_TASK_ID\" --nproc {nproc} --no-table"]
    script = sweep.out / "sweep.sbatch"
    script.write_text("\n".join(lines) + "\n")
    return script


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
        print(f"wrote {script} ({len(sweep.runs)} array tasks); submit with: sbatch {script}\n"
              f"afterwards: sdd-sweep table {args.sweep}")
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
