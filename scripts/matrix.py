"""``make matrix``: run every combination of tests/matrix.py's axes (or the CI's pairwise subset, or those
matching --only) a few steps, each checked against its reference, and write the table into
docs/matrix/table.md (every row) and its summary into docs/testing.md between its markers. Each row goes to
docs/matrix/results.jsonl as it finishes, with the commit, CPU and date it ran on: the file is committed, so
an interrupted matrix resumes where it stopped, in this clone or another (--fresh starts over).

    python scripts/matrix.py                                # everything (hours on 2 cores), every 3 settings first
    python scripts/matrix.py --subset triples               # only every 3 settings together (~110 runs)
    python scripts/matrix.py --subset pairwise              # every pair (CI runs the pairs of its own universe)
    python scripts/matrix.py --list                         # what is left to run, in order
    python scripts/matrix.py --only world=1 --only compile=off
    python scripts/matrix.py --shard 0/2 & python scripts/matrix.py --shard 1/2   # two at once, then
    python scripts/matrix.py --table-only                                         # the whole table
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import json
import os
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
RESULTS = ROOT / "docs" / "matrix" / "results.jsonl"
POOL = 24  # multi-rank combinations per torchrun launch (tests/rank_pool.py); a failure loses the rest of one


@functools.lru_cache(maxsize=1)
def full_order(ran: frozenset[Combo]) -> list[Combo]:
    product = matrix.full_product()
    return list(dict.fromkeys(matrix.covering(product, 3, ran) + product))


def select(subset: str, only: list[str], shard: str | None = None, ran: frozenset[Combo] | None = frozenset()
           ) -> list[Combo]:
    """The combinations to run, in the order they run. The full product runs a 3-wise covering first (every
    three settings together, what ``ran`` already ran counted; None: product order), then the rest: a matrix
    stopped early has tried every three settings together, not only the first of its dense
    pre-norm combinations."""
    product = matrix.full_product()
    if subset == "pairwise":
        combos = matrix.pairwise(product)
    elif subset == "triples":
        combos = matrix.covering(product, 3)
    else:
        combos = product if ran is None else full_order(ran)
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


# what a row runs: a row recorded on other code than these paths' is not compared with
CODE = ("sdd_train", "tests/matrix.py", "tests/matrix_run.py", "tests/rank_pool.py", "pyproject.toml")


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def commit() -> str:
    """The checkout's commit, with '+' when the code a row runs differs from it (rows then ran on uncommitted
    code; the matrix's own outputs and the docs do not count)."""
    head = git("rev-parse", "--short=7", "HEAD").stdout.strip() or "unknown"
    return head + ("+" if git("status", "--porcelain", "--untracked-files=no", "--", *CODE).stdout.strip() else "")


@functools.lru_cache(maxsize=None)
def same_code(recorded: str) -> bool:
    """Whether a row recorded at commit ``recorded`` ran the code this checkout runs. A row that ran on
    uncommitted code ('+') cannot be told apart from other uncommitted code, so it never counts as the same."""
    return not recorded.endswith("+") and git("diff", "--quiet", recorded, "--", *CODE).returncode == 0


RUN_ON = {"commit": "", "cpu": "", "date": ""}  # where the rows of this invocation run; set in run_matrix


def load_rows(path: Path) -> dict[str, tuple[Row, Outcome, dict[str, str]]]:
    """The rows (how each run ended, and where it ran) of earlier invocations, by name."""
    rows = {}
    by_name = {c.name: c for c in matrix.full_product()}  # names outlive axes added since a row ran
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["name"] not in by_name:
                continue  # a combination the matrix no longer has
            diff = Diff(r["steps"], r["weights"]) if r["steps"] is not None else None
            row = Row(by_name[r["name"]], r["status"], r["seconds"], r["reference"], diff, r["note"])
            if diff:  # judged again: the tolerances may have changed since
                row.status, row.note = matrix_run.judge_diff(row.combo, row.reference.split(":")[0], diff)
            rows[r["name"]] = row, Outcome(r["outcome"], r["seconds"], r["note"]), {k: r.get(k, "?") for k in RUN_ON}
    return rows


def save_row(path: Path, row: Row, outcome: Outcome) -> None:
    record = {"name": row.combo.name, "values": list(row.combo.values), "status": row.status, "outcome": outcome.status,
              "seconds": row.seconds, "reference": row.reference, "note": row.note,
              "steps": row.diff.steps if row.diff else None, "weights": row.diff.weights if row.diff else None,
              **RUN_ON}
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def headline(rows: list[Row], meta: dict[str, dict[str, str]], selected: int, command: str) -> str:
    """One sentence: what ran, where, and how it ended."""
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "refused", "fail", "untested")}
    ran = f"{len(rows)} combinations" if len(rows) == selected else f"{len(rows)} of the {selected} combinations selected"
    if not rows:
        return f"`{command}`: none of the {selected} combinations selected has run."
    where = {k: sorted({meta[r.combo.name][k] for r in rows}) for k in RUN_ON}
    dates = where["date"][0] + (f" to {where['date'][-1]}" if len(where["date"]) > 1 else "")
    wall = sum(r.seconds for r in rows)
    return (f"`{command}`, {dates}, {' / '.join(where['cpu'])}, commit {', '.join(where['commit'])} ({ran},"
            f" {wall / 60:.0f} min of runs): " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".")


def summary(rows: list[Row], head: str, table_path: str) -> str:
    """What docs/testing.md shows: the headline, the largest differences of each kind of comparison against
    the tolerance asserted, and every row that failed."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        kind = row.reference.split(":")[0] or ("refused (exit 2, one line)" if matrix.refusal(row.combo)
                                               else "none: 3 finite losses")
        groups.setdefault((kind, row.combo["precision"]), []).append(row)
    lines = [BEGIN, "", head, f"Every row: [{table_path}]({table_path}).", "",
             "| comparison | precision | combinations | pass | largest steps Δ (rel) | largest weights Δ (abs) |",
             "|---|---|---|---|---|---|"]
    for (kind, precision), group in sorted(groups.items()):
        diffs = [r.diff for r in group if r.diff]
        steps = f"{max(d.steps for d in diffs):.1e}" if diffs else ""
        weights = f"{max(d.weights for d in diffs):.1e}" if diffs else ""
        passed = sum(r.status in ("pass", "refused") for r in group)
        lines.append(f"| {kind} | {precision} | {len(group)} | {passed} | {steps} | {weights} |")
    failed = [r for r in rows if r.status in ("fail", "untested")]
    lines += ["", "Failed or untested: " + ("none." if not failed else f"{len(failed)}."), ""]
    if failed:
        lines += [*matrix_run.TABLE_HEADER, *map(matrix_run.format_row, failed), ""]
    return "\n".join(lines + [END])


def full_table(rows: list[Row], head: str) -> str:
    return "\n".join(["# The feature matrix, every row", "",
                      "Written by `scripts/matrix.py` (`make matrix`); what the axes and comparisons are:"
                      " [testing.md](../testing.md#the-feature-matrix).", "", head, "",
                      *matrix_run.TABLE_HEADER, *map(matrix_run.format_row, rows), ""])


def write_doc(doc: Path, text: str) -> None:
    old = doc.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(old):
        raise UsageError(f"{doc}: no {BEGIN} ... {END} markers to write the table between")
    doc.write_text(pattern.sub(lambda _: text, old))


def stale(where: dict[str, str]) -> bool:
    """A row recorded on other code or another CPU: a comparison with it would measure the change of code or
    machine, not the setting compared (bitwise holds on one machine with one code)."""
    return where.get("cpu") != RUN_ON["cpu"] or not same_code(where.get("commit", ""))


def forget_stale_rows(todo: list[Combo], loaded: dict, work: Path) -> None:
    """Which earlier rows this invocation runs again. A combination still to run is compared with its
    reference's run directory, so that reference runs again here where its directory is missing (results.jsonl
    is committed, run directories are not) or where it ran on other code or another CPU; and so on up the chain.
    A row that failed on other code or another CPU runs again too: the change may have fixed it."""
    for combo in todo:
        row, _, where = loaded.get(combo.name, (None, None, {}))
        if row and row.status in ("fail", "untested") and stale(where):
            del loaded[combo.name]
    for combo in todo:
        ref = matrix.reference(combo)
        while combo.name not in loaded and ref and ref[0].name in loaded:
            _, outcome, where = loaded[ref[0].name]
            lost = outcome.status == "ok" and not (work / ref[0].name / "metrics.jsonl").exists()
            if lost or stale(where):
                del loaded[ref[0].name]
            combo, ref = ref[0], matrix.reference(ref[0])


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
    parser.add_argument("--subset", choices=["full", "triples", "pairwise"], default="full",
                        help="every combination (a 3-wise covering first), only that covering, or every pair")
    parser.add_argument("--only", action="append", default=[], metavar="AXIS=VALUE",
                        help="only combinations with this value (repeatable)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "matrix", help="run directories, results.jsonl")
    parser.add_argument("--cache", type=Path, default=None, help="data cache (default: WORK/cache)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="each finished combination's row (committed, so a matrix resumes across clones)")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "testing.md", help="where the summary goes")
    parser.add_argument("--table", type=Path, default=RESULTS.parent / "table.md", help="where every row goes")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results in WORK")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one combination may take")
    parser.add_argument("--list", action="store_true", help="run nothing: list what is left to run, in order")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: write the table of the combinations WORK/results.jsonl holds")
    parser.add_argument("--shard", metavar="I/N", default=None,
                        help="only the I-th of N disjoint parts (each with its references), to run N at once into"
                             " one WORK; the table then comes from --table-only")
    parser.add_argument("--in-process", action="store_true",
                        help="one-process combinations in this process, as tests/test_matrix.py (no start-up per run;"
                             " a crash ends the matrix, which re-running resumes)")
    args = parser.parse_args()
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
        args.results.unlink(missing_ok=True)
    loaded = load_rows(args.results)
    product = {c.name: c for c in matrix.full_product()}
    ran = None if args.table_only else frozenset(product[name] for name in loaded)
    combos = select(args.subset, args.only, args.shard, ran)
    todo = matrix.with_references(combos)
    RUN_ON.update(commit=commit(), cpu=cpu_model(), date=date.today().isoformat())
    if not args.table_only:
        forget_stale_rows(todo, loaded, args.work)
    if args.list:  # before anything is written
        left = [c for c in todo if c.name not in loaded]
        try:
            print("\n".join(c.name for c in left) + f"\n{len(left)} of {len(todo)} combinations left to run")
        except BrokenPipeError:  # `--list | head` stopped reading
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    runner = matrix_run.Runner(args.work, args.cache or args.work / "cache", args.in_process, args.timeout)
    done = {name: (row, outcome) for name, (row, outcome, _) in loaded.items()}
    meta = {name: where for name, (_, _, where) in loaded.items()}
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
        save_row(args.results, row, runner.outcomes[combo])
        done[combo.name], meta[combo.name] = (row, runner.outcomes[combo]), dict(RUN_ON)
        print(f"[{i}/{len(todo)}] {matrix_run.format_row(row)}", flush=True)
    order = {name: i for i, name in enumerate(product)}  # the table lists them in product order
    rows = sorted((done[c.name][0] for c in todo if c.name in done), key=lambda row: order[row.combo.name])
    command = "make matrix" + (f" MATRIX_ARGS='{' '.join(sys.argv[1:])}'" if sys.argv[1:] else "")
    if args.shard:
        print(f"shard {args.shard}: {len(rows)} of its {len(todo)} combinations; the table: --table-only once every"
              " shard has run")
    else:
        head = headline(rows, meta, len(todo), command)
        args.table.write_text(full_table(rows, head))
        write_doc(args.doc, summary(rows, head, os.path.relpath(args.table, args.doc.parent)))
    failed = [row.combo.name for row in rows if row.status in ("fail", "untested")]
    print(f"{len(rows)} of {len(todo)} combinations in {(time.perf_counter() - start) / 60:.1f} min; {len(failed)} failed"
          " or untested" + ("" if args.shard else f"; table in {args.table}, summary in {args.doc}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
