"""Running one combination of the feature matrix (tests/matrix.py), in this process or under torchrun,
and checking it against its reference: the rows of ``make matrix``'s table and of tests/test_matrix.py."""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import small_run, threads
from matrix import STEPS, Combo, reference, refusal, tolerance


@dataclass
class Outcome:
    status: str  # ok | refused | fail
    seconds: float
    error: str = ""  # the refusal's line, or the first line that names the error


ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:)?\s*((?:[\w.]+(?:Error|Exception|Failure|Interrupt))\b.*)$", re.M)


def first_error(output: str) -> str:
    """The line that names what went wrong (a traceback's exception, or a worker's signal)."""
    for match in ERROR_LINE.finditer(output):
        if "ChildFailedError" not in match.group(1):
            return match.group(1).strip()[:300]
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "no output"


USAGE_ERROR_LINE = re.compile(r"[a-z]+ error: ")


def judge_exit(code: int, output: str, seconds: float) -> Outcome:
    """Exit 0 ran; exit 2 with exactly one usage-error line ('config error: ...', 'backend error: ...': a
    UsageError's label, sdd_train.exit_codes) and no traceback is a refusal; the rest failed."""
    if code == 0:
        return Outcome("ok", seconds)
    refusals = [line for line in output.splitlines() if USAGE_ERROR_LINE.match(line)]
    if code == 2 and len(refusals) == 1 and "Traceback" not in output:
        return Outcome("refused", seconds, refusals[0])
    return Outcome("fail", seconds, f"exit {code}: {first_error(output)}")


TORCHRUN_REPORT = re.compile(r"^E\d{4} .*elastic.* failed \(exitcode", re.M)


def judge_torchrun(code: int, output: str, seconds: float) -> Outcome:
    """As :func:`judge_exit` for the workers: torchrun exits 1 for any failing worker and appends its own
    traceback and a report of the workers' exit codes, which is not theirs to judge."""
    report = TORCHRUN_REPORT.search(output)
    if code and report:
        codes = {int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", output[report.start():])}
        code = codes.pop() if len(codes) == 1 else code
        output = output[:report.start()]
    return judge_exit(code, output, seconds)


def overrides(combo: Combo, compile_backend: str) -> list[str]:
    """The combination's settings; a compiled one compiles with ``compile_backend``."""
    backend = [f"train.compile_backend={compile_backend}"] if combo["compile"] == "on" else []
    return [*combo.overrides(), *backend]


def run(combo: Combo, run_dir: Path, cache: Path, in_process: bool = False, timeout: float = 1800,
        compile_backend: str = "inductor") -> Outcome:
    """Train ``combo`` into ``run_dir``: one process in this one (``in_process``) or as a subprocess,
    several under torchrun (gloo). Every process computes with one thread, as tests/test_distributed.py's
    ranks: a second gains nothing on these matrices, and OpenMP threads that spin waiting for each
    other make every run several times slower on a busy machine."""
    args = small_run(run_dir, cache, *overrides(combo, compile_backend))
    shutil.rmtree(run_dir, ignore_errors=True)  # a checkpoint left there would be resumed
    start = time.perf_counter()
    if in_process and combo.world == 1:
        return _run_here(args, combo, start)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sdd_train.train", *args]
    if combo.world > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={combo.world}",
                    "-m", "sdd_train.train"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome("fail", time.perf_counter() - start, f"timed out after {timeout:.0f} s")
    judge = judge_torchrun if combo.world > 1 else judge_exit
    return judge(proc.returncode, proc.stderr + proc.stdout, time.perf_counter() - start)


def _run_here(args: list[str], combo: Combo, start: float) -> Outcome:
    import torch

    from sdd_train.train.__main__ import main
    from sdd_train.train.stop_signals import STOPS

    err = io.StringIO()
    try:
        with threads(1), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args)
    except Exception as e:  # a crash is this combination's result, not the harness's
        return Outcome("fail", time.perf_counter() - start, f"{type(e).__name__}: {e}".splitlines()[0][:300])
    finally:
        if combo["compile"] == "on":
            torch._dynamo.reset()  # the next run's models would count as recompiles of these graphs
    if STOPS.received:  # SIGTERM was meant for the harness: this combination's run is not its result
        raise KeyboardInterrupt(f"stopped by signal {STOPS.received} during {combo.name}")
    return judge_exit(code, err.getvalue(), time.perf_counter() - start)


# ---- comparing a run with its reference


@dataclass
class Diff:
    steps: float  # largest relative difference of a step's loss or gradient norm
    weights: float  # largest absolute difference of a weight after the last step


def compare(run_dir: Path, ref_dir: Path) -> Diff:
    from sdd_train import checkpoint
    from sdd_train.diagnostics.summary import read_records

    a, b = ({r["step"]: r for r in read_records(d / "metrics.jsonl") if "loss" in r} for d in (run_dir, ref_dir))
    if set(a) != set(b) or set(a) != set(range(1, STEPS + 1)):
        return Diff(math.inf, math.inf)
    steps = max(abs(a[s][k] - b[s][k]) / max(abs(b[s][k]), 1e-30) for s in a for k in ("loss", "grad_norm"))
    wa, wb = (checkpoint.read_model_state(checkpoint.latest(d)) for d in (run_dir, ref_dir))
    if wa.keys() != wb.keys():
        return Diff(steps, math.inf)
    weights = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
    return Diff(steps, weights)


def finite_losses(run_dir: Path) -> bool:
    """Every step logged a finite loss (what a run without a reference is checked for)."""
    from sdd_train.diagnostics.summary import read_records

    losses = {r["step"]: r["loss"] for r in read_records(run_dir / "metrics.jsonl") if "loss" in r}
    return set(losses) == set(range(1, STEPS + 1)) and all(math.isfinite(v) for v in losses.values())


@dataclass
class Row:
    combo: Combo
    status: str  # pass | fail | refused | untested (it ran; its reference did not)
    seconds: float
    reference: str = ""  # the reference's name and the comparison's kind
    diff: Diff | None = None
    note: str = ""


def verdict(combo: Combo, outcome: Outcome, run_dir: Path, ref: tuple[Combo, str] | None,
            ref_outcome: Outcome | None, ref_dir: Path | None) -> Row:
    """The row of the table for one combination that ran (and its reference, if it has one)."""
    row = Row(combo, outcome.status, outcome.seconds, f"{ref[1]}: {ref[0].name}" if ref else "")
    expected = refusal(combo)
    if outcome.status == "refused" and not expected:
        row.note = f"not expected: {outcome.error}"
    elif outcome.status != "ok":
        row.note = outcome.error
    elif expected:
        row.status, row.note = "fail", f"ran; expected a refusal: {expected}"
    if outcome.status != "ok" or expected:
        return row
    if not finite_losses(run_dir):
        row.status, row.note = "fail", f"not {STEPS} finite losses in metrics.jsonl"
        return row
    if ref is None:
        row.status = "pass"
        return row
    if ref_outcome is None or ref_outcome.status != "ok":
        row.status, row.note = "untested", f"reference {ref_outcome.status if ref_outcome else 'not run'}"
        return row
    row.diff = compare(run_dir, ref_dir)
    row.status, row.note = judge_diff(combo, ref[1], row.diff)
    return row


def judge_diff(combo: Combo, kind: str, diff: Diff) -> tuple[str, str]:
    """Pass, or fail and by what, against the tolerance of this kind of comparison."""
    steps_tol, weights_tol = tolerance(kind, combo["precision"], combo["compile"] == "on")
    if diff.steps <= steps_tol and (weights_tol is None or diff.weights <= weights_tol):
        return "pass", ""
    return "fail", f"beyond {steps_tol:g} rel / {weights_tol if weights_tol is not None else '-'} abs"


def run_pooled(combos: list[Combo], work: Path, cache: Path, timeout: float = 1800,
               compile_backend: str = "inductor") -> dict[Combo, Outcome]:
    """Train multi-rank ``combos`` of one world size in one torchrun launch (tests/rank_pool.py), each with
    the arguments :func:`run` gives it; a refusal is exit 2 with one line, as there."""
    import rank_pool

    (world,) = {c.world for c in combos}
    for combo in combos:
        shutil.rmtree(work / combo.name, ignore_errors=True)
    jobs = [small_run(work / c.name, cache, *overrides(c, compile_backend)) for c in combos]
    pool_dir = work / f"pool-{world}-{combos[0].name}"
    shutil.rmtree(pool_dir, ignore_errors=True)
    results = rank_pool.launch(world, jobs, pool_dir, timeout)
    # a combination the pool did not reach is left out: it runs on its own, as run() starts it
    return {c: judge_exit(r.code, r.output, r.seconds) if r.code is not None
            else Outcome("fail", r.seconds, first_error(r.output)) for c, r in zip(combos, results) if r.ran}


class Runner:
    """Runs combinations into ``work`` (each once, references first) and keeps their rows. ``prefetch``
    trains the multi-rank ones of a list together, one torchrun launch per world size. Compiled
    combinations compile with ``compile_backend``: ``make matrix``'s inductor, or CI's aot_eager, which
    traces the same graphs through dynamo and AOT autograd and runs them without generating code."""

    def __init__(self, work: Path, cache: Path, in_process: bool, timeout: float = 1800,
                 compile_backend: str = "inductor"):
        self.work, self.cache, self.in_process, self.timeout = work, cache, in_process, timeout
        self.compile_backend = compile_backend
        self.outcomes: dict[Combo, Outcome] = {}
        self.rows: dict[Combo, Row] = {}
        self.prefetched: dict[Combo, Outcome] = {}

    def prefetch(self, combos: list[Combo]) -> None:
        todo = [c for c in combos if c.world > 1 and c not in self.rows and c not in self.prefetched]
        for world in sorted({c.world for c in todo}):
            self.prefetched.update(run_pooled([c for c in todo if c.world == world], self.work, self.cache,
                                              self.timeout, self.compile_backend))

    def row(self, combo: Combo) -> Row:
        if combo not in self.rows:
            ref = reference(combo)
            if ref:
                self.row(ref[0])
            outcome = self.prefetched.pop(combo, None) or run(combo, self.work / combo.name, self.cache,
                                                              self.in_process, self.timeout, self.compile_backend)
            self.outcomes[combo] = outcome
            self.rows[combo] = verdict(combo, outcome, self.work / combo.name, ref,
                                       self.outcomes.get(ref[0]) if ref else None,
                                       self.work / ref[0].name if ref else None)
        return self.rows[combo]


def format_row(row: Row) -> str:
    steps = f"{row.diff.steps:.1e}" if row.diff else ""
    weights = f"{row.diff.weights:.1e}" if row.diff else ""
    result = f"{row.status}: {row.note}" if row.note else row.status
    return f"| {row.combo.name} | {result.replace('|', '/')} | {row.reference} | {steps} | {weights} | {row.seconds:.0f} |"


TABLE_HEADER = ["| combination | result | reference (comparison) | steps Δ (rel) | weights Δ (abs) | time (s) |",
                "|---|---|---|---|---|---|"]
