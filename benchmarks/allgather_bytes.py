"""Bytes FSDP2 all-gathers and reduce-scatters per training step, per rank, for each ``parallel.param_dtype``.

    python benchmarks/allgather_bytes.py [--ranks 2] [--steps 4] [--config configs/tiny.yaml] [overrides ...]

Each dtype trains the config for ``--steps`` steps under torchrun with :class:`CountCollectives`,
a callback that wraps the collectives FSDP2 calls (``all_gather_single`` from torch 2.13,
``all_gather_into_tensor`` before; the reduce-scatter likewise) and records, per step, the bytes of
their output (all-gather: the gathered parameters) and input (reduce-scatter: the unsharded
gradients). A ring moves (ranks - 1) / ranks of those bytes in and out of each rank.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.record import write_json  # noqa: E402
from sdd_train.diagnostics.summary import read_records  # noqa: E402
from sdd_train.train.callbacks import Callback  # noqa: E402

GATHERS = ("all_gather_single", "all_gather_into_tensor")
SCATTERS = ("reduce_scatter_single", "reduce_scatter_tensor")


class CountCollectives(Callback):
    """Records ``collective_bytes`` events: each step's all-gather and reduce-scatter bytes and dtypes."""

    name = "count_collectives"

    def on_fit_start(self, trainer) -> None:
        import torch.distributed as dist

        self.bytes: Counter[str] = Counter()
        self.dtypes: set[str] = set()

        def counting(fn, kind: str, arg: str, position: int):
            def run(*args, **kwargs):
                tensor = kwargs[arg] if arg in kwargs else args[position]
                self.bytes[kind] += tensor.numel() * tensor.element_size()
                if kind == "all_gather":
                    self.dtypes.add(str(tensor.dtype))
                return fn(*args, **kwargs)
            return run

        for names, kind, arg, position in ((GATHERS, "all_gather", "output_tensor", 0),
                                           (SCATTERS, "reduce_scatter", "input", 1)):
            name = next(n for n in names if hasattr(dist, n))
            setattr(dist, name, counting(getattr(dist, name), kind, arg, position))

    def post_step(self, trainer, step: int, out: Any) -> None:
        trainer.write("events", {"step": step, "event": "collective_bytes", **self.bytes,
                                 "all_gather_dtypes": sorted(self.dtypes)})
        self.bytes.clear()


def run(param_dtype: str, ranks: int, config: str, steps: int, overrides: list[str], root: Path) -> dict:
    run_dir = root / param_dtype
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [config, f"run_dir={run_dir}", f"train.max_steps={steps}", "train.eval_interval=0",
            "train.checkpoint_interval=0", "diagnostics.layer_stats_interval=0", "diagnostics.activation_interval=0",
            f"parallel.param_dtype={param_dtype}", "callbacks=[{path: 'benchmarks.allgather_bytes:CountCollectives'}]",
            *overrides]
    cores = os.cpu_count() or 1
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks)),
           "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           "-m", "sdd_train.train", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    records = [r for r in read_records(run_dir / "events.jsonl") if r.get("event") == "collective_bytes"]
    last = records[-1]  # every step gathers the same: the last is a steady step
    return {"param_dtype": param_dtype, "ranks": ranks, "all_gather_bytes": last["all_gather"],
            "reduce_scatter_bytes": last["reduce_scatter"], "all_gather_dtypes": last["all_gather_dtypes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", default="runs/bench_allgather_bytes.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    root = Path("runs/bench_allgather_bytes")
    rows = [run(d, args.ranks, args.config, args.steps, ["train.compile=false", *args.overrides], root)
            for d in ("fp32", "bf16")]
    print(f"\n{'param_dtype':>11} {'all-gather MiB':>15} {'reduce-scatter MiB':>19} {'gathered as':>12}")
    for r in rows:
        print(f"{r['param_dtype']:>11} {r['all_gather_bytes'] / 2**20:>15.2f} {r['reduce_scatter_bytes'] / 2**20:>19.2f}"
              f" {','.join(r['all_gather_dtypes']):>12}")
    write_json(args.json, config=args.config, overrides=args.overrides, rows=rows)


if __name__ == "__main__":
    main()
