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
import csv
import io
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sdd_train.config import ConfigError, as_dict, load_config
from sdd_train.train.metrics import read_metrics

EXIT_FILE = "exit_code"
DIVERGED_EXIT = 3


@dataclass
class Axis:
    name: str
    points: dict[str, list[str]]  # label -> overrides
    key: str | None = None  # set when the axis sweeps one config key


@dataclass
class Run:
    name: str
    labels: dict[str, str]  # axis name -> point label
    overrides: list[str]  # resolved: every '*=' replaced by '='
    run_dir: str


@dataclass
class Sweep:
    name: str
    base: Path
    out: Path
    overrides: list[str]
    axes: list[Axis]
    diverge_loss: float | None = None
    runs: list[Run] = field(default_factory=list)


# --------------------------------------------------------------------------- parsing


def _label(axis: str, value: Any) -> str:
    text = str(value)
    return f"{axis}{text}" if isinstance(value, (int, float)) and not isinstance(value, bool) else text


def _axis(i: int, raw: Any) -> Axis:
    where = f"axes.{i}"
    if not isinstance(raw, dict) or "name" not in raw or "values" not in raw:
        raise ConfigError(f"{where}: each axis needs 'name' and 'values' (and 'key' when values is a list)")
    unknown = set(raw) - {"name", "key", "values"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; allowed: name, key, values")
    name, key, values = str(raw["name"]), raw.get("key"), raw["values"]
    if isinstance(values, list):
        if not key:
            raise ConfigError(f"{where}.key: a list of values needs the config key they set (e.g. key: model.block)")
        if not values:
            raise ConfigError(f"{where}.values: empty")
        points = {_label(name, v): [f"{key}={v}"] for v in values}
    elif isinstance(values, dict):
        if key:
            raise ConfigError(f"{where}.key: named points carry their own overrides; drop 'key'")
        points = {}
        for label, overrides in values.items():
            if overrides is None:
                overrides = []
            if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
                raise ConfigError(f"{where}.values.{label}: must be a list of 'key=value' or 'key*=factor' strings")
            points[str(label)] = list(overrides)
    else:
        raise ConfigError(f"{where}.values: a list (with 'key') or a mapping label -> overrides")
    if len(points) != len(values):
        raise ConfigError(f"{where}.values: two values give the same run label")
    return Axis(name=name, points=points, key=key)


def _resolve(base: Path, overrides: list[str]) -> list[str]:
    """Replace every ``key*=factor`` by ``key=<value the run would have> * factor``; validate the result."""
    plain = [o for o in overrides if "*=" not in o]
    if len(plain) == len(overrides):
        load_config(base, plain)
        return overrides
    resolved: list[str] = []
    for o in overrides:
        if "*=" not in o:
            resolved.append(o)
            continue
        key, factor = o.split("*=", 1)
        try:
            factor_value = float(factor)
        except ValueError:
            raise ConfigError(f"override '{o}': the factor after '*=' must be a number") from None
        current = OmegaConf.select(OmegaConf.create(as_dict(load_config(base, resolved))), key,
                                   throw_on_missing=False, default="__missing__")
        if current == "__missing__":
            raise ConfigError(f"override '{o}': '{key}' is not a config key")
        if not isinstance(current, (int, float)) or isinstance(current, bool):
            raise ConfigError(f"override '{o}': '{key}' is {current!r}, not a number that can be multiplied")
        value = current * factor_value
        resolved.append(f"{key}={int(value) if isinstance(current, int) and value.is_integer() else value!r}")
    load_config(base, resolved)  # every run's config must load before anything starts
    return resolved


def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep file and expand its grid (every run's config is loaded once)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    unknown = set(raw) - {"name", "base", "out", "overrides", "axes", "diverge_loss"}
    if unknown:
        raise ConfigError(f"{', '.join(sorted(unknown))}: unknown sweep field(s) in {path}; allowed: name, base, out,"
                          " overrides, axes, diverge_loss")
    for key in ("name", "base", "axes"):
        if key not in raw:
            raise ConfigError(f"{key}: missing in {path}")
    if not isinstance(raw["axes"], list) or not raw["axes"]:
        raise ConfigError(f"axes: in {path} must be a non-empty list of axes")
    name = str(raw["name"])
    sweep = Sweep(name=name, base=(path.parent / str(raw["base"])).resolve(),
                  out=Path(raw.get("out") or Path("runs") / "sweeps" / name),
                  overrides=[str(o) for o in raw.get("overrides") or []],
                  axes=[_axis(i, a) for i, a in enumerate(raw["axes"])],
                  diverge_loss=float(raw["diverge_loss"]) if raw.get("diverge_loss") is not None else None)
    if not sweep.base.is_file():
        raise ConfigError(f"base: {sweep.base} not found (paths are relative to {path})")
    names = [a.name for a in sweep.axes]
    if len(set(names)) != len(names):
        raise ConfigError(f"axes: two axes are named the same ({', '.join(names)})")
    for combo in itertools.product(*(a.points.items() for a in sweep.axes)):
        labels = {axis.name: label for axis, (label, _) in zip(sweep.axes, combo)}
        run_name = "-".join(labels.values())
        overrides = sweep.overrides + [o for _, point in combo for o in point]
        try:
            resolved = _resolve(sweep.base, overrides)
        except ConfigError as e:
            raise ConfigError(f"run {run_name}: {e}") from None
        run_dir = sweep.out / run_name
        sweep.runs.append(Run(run_name, labels, resolved + [f"run_dir={run_dir}", f"name={run_name}"], str(run_dir)))
    return sweep


# --------------------------------------------------------------------------- running


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
    if exit_file.is_file() and int(exit_file.read_text()) in (0, DIVERGED_EXIT):
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
              f"{shlex.quote(sys.executable)} -m sdd_train.diagnostics.sweep run {shlex.quote(str(sweep_file))}"
              f" --index \"$SLURM_ARRAY_TASK_ID\" --nproc {nproc} --no-table"]
    script = sweep.out / "sweep.sbatch"
    script.write_text("\n".join(lines) + "\n")
    return script


# --------------------------------------------------------------------------- results


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a run's jsonl file; [] when the run has not written it (yet)."""
    return read_metrics(path) if path.is_file() else []


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summarise(run_dir: str | Path, diverge_loss: float | None = None) -> dict[str, Any]:
    """Final losses, divergence (and its step), max grad norm, tokens/s and spike count of one run."""
    run_dir = Path(run_dir)
    records = read_records(run_dir / "metrics.jsonl")
    events = read_records(run_dir / "events.jsonl")
    exit_file = run_dir / EXIT_FILE
    code = int(exit_file.read_text()) if exit_file.is_file() else None
    train = [r for r in records if "loss" in r]
    good = [r for r in train if _finite(r["loss"]) and not r.get("skipped")]
    val = [r for r in records if "val_loss" in r]
    tail = good[-5:]
    bad = [e["step"] for e in events if e.get("event") == "nonfinite"]
    bad += [r["step"] for r in train if not (_finite(r["loss"]) and _finite(r.get("grad_norm", 0.0)))]
    diverged_at = min(bad) if bad else None
    if diverged_at is None and code == DIVERGED_EXIT:
        diverged_at = (train[-1]["step"] + 1) if train else 1
    final_loss = sum(r["loss"] for r in tail) / len(tail) if tail else math.nan
    if diverged_at is None and diverge_loss is not None and good and final_loss > diverge_loss:
        above = len(good)  # the run stayed above the threshold from this logged record to the end
        while above > 0 and good[above - 1]["loss"] > diverge_loss:
            above -= 1
        diverged_at = good[above]["step"] if above < len(good) else good[-1]["step"]
    rates = [r["tokens_per_sec"] for r in good[1:] if "tokens_per_sec" in r]  # the first includes warm-up
    return {
        "exit": code,
        "steps": train[-1]["step"] if train else 0,
        "final_loss": final_loss,
        "val_loss": val[-1]["val_loss"] if val else math.nan,
        "diverged": diverged_at is not None,
        "diverged_at": diverged_at,
        "max_grad_norm": max((g for r in train + events for g in (r.get("grad_norm"), r.get("grad_norm_max"))
                              if _finite(g)), default=math.nan),
        "tokens_per_sec": sorted(rates)[len(rates) // 2] if rates else math.nan,
        "spikes": sum(1 for e in events if e.get("event") == "loss_spike"),
    }


def results(manifest_dir: str | Path) -> list[dict[str, Any]]:
    """One row per run of a sweep directory (its ``sweep.json``): axis labels + :func:`summarise`."""
    manifest = json.loads((Path(manifest_dir) / "sweep.json").read_text())
    return [{"run": r["name"], **r["labels"], **summarise(r["run_dir"], manifest.get("diverge_loss"))}
            for r in manifest["runs"]]


def format_cell(value: Any) -> str:
    """A table cell: yes/no, - for missing, thousands separators for big numbers, 4 digits otherwise."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def write_table(manifest_dir: str | Path) -> tuple[Path, Path]:
    """``results.md`` and ``results.csv`` in the sweep directory; returns their paths."""
    out = Path(manifest_dir)
    rows = results(out)
    columns = list(rows[0])
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(format_cell(r[c]) for c in columns) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    (out / "results.csv").write_text(buffer.getvalue())
    return out / "results.md", out / "results.csv"


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
    except ConfigError as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
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
                print(f"sweep error: --index {args.index} is outside 0..{len(runs) - 1}", file=sys.stderr)
                return 2
            runs = [runs[args.index]]
        for i, run in enumerate(runs):
            if args.dry_run:
                print(f"[{sweep.runs.index(run)}] {run.name}: {shlex.join(train_command(sweep, run, args.nproc))}")
                continue
            code = run_one(sweep, run, args.nproc)
            verdict = {0: "done", DIVERGED_EXIT: "diverged"}.get(code, f"failed (exit {code})")
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
