"""What bf16 changes in the loss: every run of a sweep trained in this process, eager, with bf16 matrix
products computed by fp32 GEMMs (:class:`Bf16GemmInFp32`), and a table per group of runs that differ
only in the compared axis (the sweep's last, or ``--compare``).

    python benchmarks/bf16_loss.py configs/sweeps/param_dtype.yaml
    python benchmarks/bf16_loss.py configs/repro/robustness_param_dtype.yaml --out runs/bf16/robustness

Why the stand-in: on a CPU without AVX-512 bf16 or AMX, PyTorch multiplies bf16 matrices in its
reference loop, ~26x slower than fp32 (docs/benchmarks.md), which puts a bf16 run of the tiny recipe at
hours. A bf16 GEMM accumulates in fp32 and rounds its output to bf16 once, on GPUs and in that loop
alike; an fp32 GEMM of the same bf16 inputs, rounded once, computes them at fp32 speed up to the
order of the fp32 sums (tests/test_bf16_loss.py: as accurate as PyTorch's own bf16 kernel against
float64, and a training run through it matches the native bf16 run).
Everything else (the bf16 parameters, the autocast casts, attention, the norms) runs as it would.
The run directories make a sweep directory (``sweep.json``): ``sdd-report OUT`` plots them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.record import write_json  # noqa: E402
from sdd_train.diagnostics.summary import EXIT_FILE, read_records, summarise  # noqa: E402
from sdd_train.exit_codes import UsageError, report_usage_error  # noqa: E402
from sdd_train.sweeps.launch import write_manifest  # noqa: E402

aten = torch.ops.aten
GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


class Bf16GemmInFp32(TorchDispatchMode):
    """Every bf16 matrix product (mm, addmm, bmm, baddbmm) as an fp32 GEMM of its bf16 operands, rounded
    to bf16 once: the same result as a bf16 GEMM with fp32 accumulation, at fp32 GEMM speed."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GEMMS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
            return func(*up, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def train_run(base: Path, overrides: list[str]) -> int:
    """Train one run in this process under the stand-in; returns its exit code."""
    from sdd_train.train.__main__ import main

    with Bf16GemmInFp32():
        return main([str(base), *overrides, "train.compile=false"])


def loss_curve(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_records(run_dir / "metrics.jsonl") if "loss" in r}


def compare(rows: list[dict], axis: str) -> list[str]:
    """Markdown rows: each run's final and validation loss, and its largest loss difference at a logged
    step from the first point of ``axis`` with every other label equal."""
    lines = [f"| run | {axis} | final loss | val loss | max abs Δ loss vs first {axis} (step) |", "|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple((k, v) for k, v in row["labels"].items() if k != axis), []).append(row)
    for members in groups.values():
        first = loss_curve(Path(members[0]["run_dir"]))
        for row in members:
            curve = loss_curve(Path(row["run_dir"]))
            diffs = [(abs(curve[s] - first[s]), s) for s in curve.keys() & first.keys()
                     if math.isfinite(curve[s]) and math.isfinite(first[s])]
            delta, step = max(diffs) if diffs else (math.nan, "-")
            lines.append(f"| {row['name']} | {row['labels'][axis]} | {row['final_loss']:.4f} | {row['val_loss']:.4f}"
                         f" | {delta:.4f} ({step}) |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="run directories (default: runs/bf16/<sweep name>)")
    parser.add_argument("--compare", default=None, help="the axis whose points are compared (default: the last)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    try:
        from sdd_train.config import ConfigError
        from sdd_train.sweeps.grid import load_sweep

        try:
            sweep = load_sweep(args.sweep)
        except ConfigError as e:
            raise UsageError(str(e)) from None
        axis = args.compare or sweep.axes[-1].name
        if axis not in (a.name for a in sweep.axes):
            raise UsageError(f"--compare {axis}: the sweep's axes are {', '.join(a.name for a in sweep.axes)}")
    except UsageError as e:
        return report_usage_error(e)
    torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / "bf16" / sweep.name
    # the sweep with its runs moved under ``out``: its sweep.json is what sdd-sweep writes (sdd-report reads it)
    sweep = dataclasses.replace(sweep, out=out, runs=[
        dataclasses.replace(r, run_dir=str(out / r.name), overrides=[
            *(o for o in r.overrides if not o.startswith("run_dir=")), f"run_dir={out / r.name}"])
        for r in sweep.runs])
    rows = []
    for run in sweep.runs:
        exit_file = Path(run.run_dir) / EXIT_FILE
        if not exit_file.is_file():  # a finished run is kept; an interrupted one resumes from its checkpoint
            exit_file.write_text(f"{train_run(sweep.base, run.overrides)}\n")
        rows.append({"name": run.name, "labels": run.labels, "run_dir": run.run_dir,
                     **summarise(run.run_dir, sweep.diverge_loss)})
        print(f"{run.name}: final loss {rows[-1]['final_loss']:.4f}, val {rows[-1]['val_loss']:.4f}", flush=True)
    write_manifest(sweep)
    table = compare(rows, axis)
    print("\n".join(table))
    write_json(out / "bf16_loss.json", sweep=str(args.sweep), compared=axis, rows=rows, table=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
