"""``make matrix``: run every combination of tests/matrix.py's axes (or the CI's pairwise subset, or those
matching --only) a few steps, each checked against its reference, and write the table into
docs/testing.md between its markers. Results go to WORK/results.jsonl as they come, so an interrupted
matrix resumes where it stopped (--fresh starts over).

    python scripts/matrix.py                                # everything (hours on 2 cores)
    python scripts/matrix.py --subset pairwise              # what CI runs
    python scripts/matrix.py --only world=1 --only compile=off
    python scripts/matrix.py --shard 0/2 & python scripts/matrix.py --shard 1/2   # two at once, then
    python scripts/matrix.py --table-only                                         # the whole table
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import matrix  # noqa: E402
import matrix_run  # noqa: E402
from matrix import AXES, Combo  # noqa: E402
from matrix_run import Diff, Outcome, Row  # noqa: E402

from sdd_train.exit_codes import UsageError, report_usage_error  # noqa: E402

BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"
POOL = 24  # multi-rank combinations per torchrun launch (tests/rank_pool.py); a failure loses the rest of one


def select(subset: str, only: list[str], shard: str | None = None) -> list[Combo]:
    product = matrix.full_product()
    combos = matrix.pairwise(product) if subset == "pairwise" else product
    if shard:
        index, _, count = shard.partition("/")
        if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
            raise UsageError(f"--shard {shard}: expected I/N with 0 <= I < N, e.g. 0/2")
        # a combination and its references share a root, so they land in the same shard; roots go round-robin
        roots = {r: i for i, r in enumerate(dict.fromkeys(matrix.root(c) for c in product))}
        combos = [c for c in combos if roots[matrix.root(c)] % int(count) == int(index)]
    for condition in only:
        axis, _, value = condition.partition("=")
        if axis not in AXES or value not in (*AXES[axis], matrix.NA):
            raise UsageError(f"--only {condition}: expected AXIS=VALUE with AXIS one of {', '.join(AXES)}")
        combos = [c for c in combos if c[axis] == value]
    return combos


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_rows(path: Path) -> dict[str, tuple[Row, Outcome]]:
    """The rows (and how each run ended) of earlier invocations, by name."""
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            diff = Diff(r["steps"], r["weights"]) if r["steps"] is not None else None
            row = Row(Combo(tuple(r["values"])), r["status"], r["seconds"], r["reference"], diff, r["note"])
            if diff:  # judged again: the tolerances may have changed since
                row.status, row.note = matrix_run.judge_diff(row.combo, row.reference.split(":")[0], diff)
            rows[r["name"]] = row, Outcome(r["outcome"], r["seconds"], r["note"])
    return rows


def save_row(path: Path, row: Row, outcome: Outcome) -> None:
    record = {"name": row.combo.name, "values": list(row.combo.values), "status": row.status, "outcome": outcome.status,
              "seconds": row.seconds, "reference": row.reference, "note": row.note,
              "steps": row.diff.steps if row.diff else None, "weights": row.diff.weights if row.diff else None}
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def table(rows: list[Row], selected: int, command: str, wall: float) -> str:
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "refused", "fail", "untested")}
    ran = f"{len(rows)} combinations" if len(rows) == selected else f"{len(rows)} of the {selected} combinations selected"
    lines = [BEGIN, "",
             f"`{command}` on {date.today().isoformat()}, {cpu_model()} ({ran},"
             f" {wall / 60:.0f} min of runs): " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".",
             "", *matrix_run.TABLE_HEADER, *map(matrix_run.format_row, rows), "", END]
    return "\n".join(lines)


def write_doc(doc: Path, text: str) -> None:
    old = doc.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(old):
        raise UsageError(f"{doc}: no {BEGIN} ... {END} markers to write the table between")
    doc.write_text(pattern.sub(lambda _: text, old))


def main() -> int:
    """Exit 0 when every combination passed or was refused as expected, 1 when one failed, 2 (one line)
    for a usage error, 130 when stopped (SIGINT, or SIGTERM during an in-process run)."""
    try:
        return run_matrix()
    except UsageError as e:
        return report_usage_error(e)
    except KeyboardInterrupt as e:
        print(f"matrix: {e or 'interrupted'}; the combinations before it are in results.jsonl, re-run to resume",
              file=sys.stderr)
        return 130


def run_matrix() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", choices=["full", "pairwise"], default="full")
    parser.add_argument("--only", action="append", default=[], metavar="AXIS=VALUE",
                        help="only combinations with this value (repeatable)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "matrix", help="run directories, results.jsonl")
    parser.add_argument("--cache", type=Path, default=None, help="data cache (default: WORK/cache)")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "testing.md")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results in WORK")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one combination may take")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: write the table of the combinations WORK/results.jsonl holds")
    parser.add_argument("--shard", metavar="I/N", default=None,
                        help="only the I-th of N disjoint parts (each with its references), to run N at once into"
                             " one WORK; the table then comes from --table-only")
    parser.add_argument("--in-process", action="store_true",
                        help="one-process combinations in this process, as tests/test_matrix.py (no start-up per run;"
                             " a crash ends the matrix, which re-running resumes)")
    args = parser.parse_args()
    combos = select(args.subset, args.only, args.shard)
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    results = args.work / "results.jsonl"
    done = load_rows(results)
    runner = matrix_run.Runner(args.work, args.cache or args.work / "cache", args.in_process, args.timeout)
    todo = matrix.with_references(combos)
    start = time.perf_counter()
    for i, combo in enumerate(todo, 1):
        if args.table_only and combo.name not in done:
            continue
        if combo.name in done:
            runner.rows[combo], runner.outcomes[combo] = done[combo.name]
            continue
        if combo.world > 1 and combo not in runner.prefetched:  # the next multi-rank runs: one launch
            runner.prefetch([c for c in todo[i - 1:] if c.world == combo.world and c.name not in done][:POOL])
        row = runner.row(combo)
        save_row(results, row, runner.outcomes[combo])
        done[combo.name] = row, runner.outcomes[combo]
        print(f"[{i}/{len(todo)}] {matrix_run.format_row(row)}", flush=True)
    rows = [done[c.name][0] for c in todo if c.name in done]
    wall = sum(row.seconds for row in rows)
    command = "make matrix" + (f" MATRIX_ARGS='{' '.join(sys.argv[1:])}'" if sys.argv[1:] else "")
    if args.shard:
        print(f"shard {args.shard}: {len(rows)} of its {len(todo)} combinations; the table: --table-only once every"
              " shard has run")
    else:
        write_doc(args.doc, table(rows, len(todo), command, wall))
    failed = [row.combo.name for row in rows if row.status in ("fail", "untested")]
    print(f"{len(rows)} of {len(todo)} combinations in {(time.perf_counter() - start) / 60:.1f} min; {len(failed)} failed"
          " or untested" + ("" if args.shard else f"; table in {args.doc}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
