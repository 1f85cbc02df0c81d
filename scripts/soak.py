"""``make soak``: the fault-injection suite at length (tests/test_faults.py is its short version).

Injects, into runs of a small model on CPU:

- ``kill -9`` at random moments (``--kills``, default 20) of one run, re-running it after each;
- damage to the latest checkpoint, each kind of file (shard overwritten or truncated or missing,
  DCP metadata, RNG state, meta.json, manifest), ``--repeats`` times at random offsets;
- a full filesystem during saves (a small tmpfs; root only, else skipped);
- a dead rank: one of two torchrun workers killed mid-run, ``--repeats`` times.

After each, the run is completed and every logged loss compared, bitwise, with an uninterrupted
run's. The summary table (faults injected, runs lost, values differing: both must be 0) is written
into docs/reliability.md between its ``soak`` markers, with the date, machine and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.max_corpus_bytes=300000", "data.tokenizer_vocab_size=512", "data.val_fraction=0.3",
         "model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_hidden=128", "model.max_seq_len=64", "train.seq_len=64", "train.global_batch_size=8",
         "train.micro_batch_size=2", "train.compile=false", "train.log_interval=1", "optim.lr=3e-3",
         "optim.warmup_steps=5", "train.precision=fp32", "train.eval_interval=0", "model.block=sdd",
         "diagnostics.layer_stats_interval=0", "diagnostics.activation_interval=0", "train.checkpoint_interval=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = [sys.executable, "-m", "sdd_train.train", str(ROOT / "configs" / "tiny.yaml")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "sdd_train.train", str(ROOT / "configs" / "tiny.yaml")]


def losses(run: Path) -> dict[int, float]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def differing(run: Path, reference: dict[int, float]) -> int:
    got = losses(run)
    return sum(got.get(step) != loss for step, loss in reference.items())


def train(run: Path, steps: int, *extra: str, launcher: list[str] = TRAIN) -> int:
    cmd = [*launcher, *SMALL, f"run_dir={run}", f"train.max_steps={steps}", *extra]
    return subprocess.run(cmd, env=ENV, capture_output=True, timeout=1800).returncode


def wait_for(run: Path, proc: subprocess.Popen, step: int) -> bool:
    while proc.poll() is None:
        if max(losses(run), default=0) >= step:
            return True
        time.sleep(0.01)
    return False


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(found)


# --------------------------------------------------------------------------- the faults


def kills(work: Path, steps: int, n: int, rng: random.Random, reference: dict[int, float]) -> tuple[int, int, int]:
    """``n`` SIGKILLs at random moments of one run (a random step, then a random delay within it)."""
    run = work / "kills"
    done = 0
    while done < n:
        cmd = [*TRAIN, *SMALL, f"run_dir={run}", f"train.max_steps={steps}", "train.checkpoint_interval=1"]
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = rng.randint(max(losses(run), default=0) + 1, steps)
        reached = wait_for(run, proc, target)
        if reached:
            time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.kill()
            done += 1
        proc.wait()
        if max(losses(run), default=0) >= steps:  # it finished before the kill: start the run anew
            shutil.rmtree(run)
    lost = int(train(run, steps) != 0)
    return n, lost, differing(run, reference)


def damage(path: Path, kind: str, rng: random.Random) -> None:
    def shard() -> Path:
        return rng.choice(sorted(path.glob("*.distcp")))

    if kind in ("shard_overwritten", "dcp_metadata"):
        target = shard() if kind == "shard_overwritten" else path / ".metadata"
        data = bytearray(target.read_bytes())
        at = rng.randrange(len(data))
        data[at:at + 4096] = bytes((b + 1) % 256 for b in data[at:at + 4096])
        target.write_bytes(bytes(data))
    elif kind in ("shard_truncated", "rng_state"):
        target = shard() if kind == "shard_truncated" else path / "rng" / "rank_0.pt"
        target.write_bytes(target.read_bytes()[: rng.randrange(target.stat().st_size)])
    elif kind == "shard_missing":
        shard().unlink()
    elif kind in ("meta_json", "manifest"):
        (path / ("meta.json" if kind == "meta_json" else "manifest.json")).write_text("{ damaged")
    else:
        raise ValueError(kind)


KINDS = ("shard_overwritten", "shard_truncated", "shard_missing", "dcp_metadata", "rng_state", "meta_json", "manifest")


def corruption(work: Path, steps: int, repeats: int, rng: random.Random,
               reference: dict[int, float]) -> dict[str, tuple[int, int, int]]:
    base = work / "base"
    train(base, steps // 2, f"optim.horizon_steps={steps}")  # the schedule of the whole run
    out = {}
    for kind in KINDS:
        lost = diff = 0
        for i in range(repeats):
            run = work / f"{kind}_{i}"
            shutil.copytree(base, run)
            latest = sorted(p for p in (run / "checkpoints").glob("step_*") if p.name[5:].isdigit())[-1]
            damage(latest, kind, rng)
            lost += int(train(run, steps) != 0)
            diff += differing(run, reference)
        out[kind] = (repeats, lost, diff)
    return out


def full_disk(work: Path, steps: int, reference: dict[int, float]) -> tuple[int, int, int] | None:
    mount = work / "small_fs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        return None
    try:
        run = mount / "run"
        train(run, steps, "train.checkpoint_failure=retry", "train.checkpoint_interval=1", "train.keep_checkpoints=100")
        events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]
        failed = sum(e["event"] == "checkpoint_failed" for e in events)
        final = work / "after_full_disk"
        shutil.copytree(run, final, ignore=shutil.ignore_patterns("*.partial"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    lost = int(train(final, steps) != 0)  # with space again, the run completes from what was saved
    return failed, lost, differing(final, reference)  # failed == 0: the tmpfs never filled up


def dead_rank(work: Path, steps: int, repeats: int, rng: random.Random) -> tuple[int, int, int]:
    clean = work / "two_ranks_clean"
    train(clean, steps, launcher=TORCHRUN)
    reference = losses(clean)
    lost = diff = 0
    for i in range(repeats):
        run = work / f"dead_rank_{i}"
        cmd = [*TORCHRUN, *SMALL, f"run_dir={run}", f"train.max_steps={steps}"]
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        wait_for(run, proc, rng.randint(3, steps - 1))
        workers = children(proc.pid)
        if workers:
            os.kill(rng.choice(workers), signal.SIGKILL)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # a hang counts as a lost run
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            lost += 1
        lost += int(train(run, steps, launcher=TORCHRUN) != 0)
        diff += differing(run, reference)
    return repeats, lost, diff


# --------------------------------------------------------------------------- the report


def write_report(rows: list[tuple[str, int, int, int]], command: str, seconds: float, doc: Path) -> None:
    table = ["| fault | injected | runs lost | values differing |", "|---|---|---|---|"]
    table += [f"| {name} | {n} | {lost} | {diff} |" for name, n, lost, diff in rows]
    block = (f"<!-- soak:begin -->\n`{command}` on {datetime.date.today().isoformat()}, {platform.platform()},"
             f" {os.cpu_count()} CPUs, {seconds / 60:.0f} min:\n\n" + "\n".join(table) + "\n<!-- soak:end -->")
    text = doc.read_text() if doc.is_file() else "# Reliability\n\n<!-- soak:begin -->\n<!-- soak:end -->\n"
    start, end = text.index("<!-- soak:begin -->"), text.index("<!-- soak:end -->") + len("<!-- soak:end -->")
    doc.write_text(text[:start] + block + text[end:])
    print("\n".join(table))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="per kind of damaged file, and dead ranks")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--doc", default=str(ROOT / "docs" / "reliability.md"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    start = time.time()
    rows: list[tuple[str, int, int, int]] = []
    with tempfile.TemporaryDirectory(prefix="sdd_soak_") as tmp:
        work = Path(tmp)
        train(work / "reference", args.steps)
        reference = losses(work / "reference")
        assert len(reference) == args.steps, "the reference run failed"
        rows.append(("kill -9 at a random moment, then re-run", *kills(work, args.steps, args.kills, rng, reference)))
        for kind, result in corruption(work, args.steps, args.repeats, rng, reference).items():
            rows.append((f"latest checkpoint damaged: {kind.replace('_', ' ')}", *result))
        result = full_disk(work, args.steps, reference)
        rows.append(("filesystem full during saves (tmpfs)", *result) if result else
                    ("filesystem full during saves (tmpfs)", 0, 0, 0))
        rows.append(("one of 2 ranks killed mid-run, then re-run", *dead_rank(work, args.steps, args.repeats, rng)))
    command = "make soak" + (f" SOAK_ARGS='{' '.join(sys.argv[1:])}'" if sys.argv[1:] else "")
    write_report(rows, command, time.time() - start, Path(args.doc))
    return 0 if all(lost == 0 and diff == 0 for _, _, lost, diff in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
