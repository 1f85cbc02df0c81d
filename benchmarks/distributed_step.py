"""Step time and tokens/s of a real training run on 1 process and on N ranks (torchrun, FSDP2).

    python benchmarks/distributed_step.py [--ranks 1 2] [--steps 20] [overrides ...]

Each world size trains the same config from scratch for ``--steps`` steps in a fresh run
directory; the result is the median ``step_time`` the trainer logged after the first
``--skip`` steps (compile and warm-up). On CPU every rank gets cores / ranks threads.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdd_train.diagnostics.summary import read_records  # noqa: E402
from benchmarks.record import write_json  # noqa: E402


def run(ranks: int, config: str, steps: int, skip: int, overrides: list[str], root: Path) -> dict:
    run_dir = root / f"ranks_{ranks}"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [config, f"run_dir={run_dir}", f"train.max_steps={steps}", "train.log_interval=1",
            "train.eval_interval=0", "train.checkpoint_interval=0", *overrides]
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks))}
    if ranks == 1:
        cmd = [sys.executable, "-m", "sdd_train.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "sdd_train.train", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    records = [r for r in read_records(run_dir / "metrics.jsonl") if "step_time" in r and r["step"] > skip]
    step_s = statistics.median(r["step_time"] for r in records)
    tokens = records[0]["tokens_per_sec"] * records[0]["step_time"]
    return {"ranks": ranks, "step_s": step_s, "tokens_per_sec": tokens / step_s,
            "final_loss": records[-1]["loss"], "peak_mem_gib_rank0": records[-1].get("peak_mem_gib")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=5, help="leading steps excluded (compile, warm-up)")
    parser.add_argument("--json", default="runs/bench_distributed.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    root = Path("runs/bench_distributed")
    rows = [run(n, args.config, args.steps, args.skip, args.overrides, root) for n in args.ranks]
    print(f"\n{'ranks':>5} {'step (s)':>9} {'tokens/s':>10} {'final loss':>10}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['step_s']:>9.3f} {r['tokens_per_sec']:>10,.0f} {r['final_loss']:>10.4f}")
    write_json(args.json, config=args.config, overrides=args.overrides, rows=rows)


if __name__ == "__main__":
    main()
