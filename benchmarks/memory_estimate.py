"""The memory estimate (``sdd-train CONFIG --estimate-memory``) against measured CPU peaks.

    python benchmarks/memory_estimate.py                  # the table of docs/distributed.md
    python benchmarks/memory_estimate.py --measure CONFIG [overrides]   # one measured peak (JSON);
                                                          # under torchrun, rank 0's
    python benchmarks/memory_estimate.py --device cuda --json OUT.json   # on a GPU (make bench-gpu)

For each case the estimate runs on fake tensors in this process; the measurement trains two real
steps on CPU (one process, or 2 gloo ranks under torchrun) with the profiler counting every
allocation (sdd_train/plan/measured.py). Both take the GPU's paths in PyTorch ops.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.record import write_json  # noqa: E402
from sdd_train.config import load_config  # noqa: E402

MIB = 2**20
# (label, config, overrides): the tiny models, and a GPT-2-small-sized one
FP32 = ["train.compile=false", "train.precision=fp32"]  # bf16 matmuls crawl on CPUs without bf16 units
CASES = [
    ("tiny", "configs/tiny.yaml", FP32),
    ("tiny, AC full", "configs/tiny.yaml", [*FP32, "parallel.activation_checkpointing=full"]),
    ("tiny MoE", "configs/tiny_moe.yaml", FP32),
    ("mid (d768, 12 layers, seq 512)", "configs/tiny.yaml",
     [*FP32, "model.d_model=768", "model.n_layers=12", "model.n_heads=12", "model.n_kv_heads=4",
      "model.ffn_hidden=2048", "model.max_seq_len=512", "train.seq_len=512", "train.micro_batch_size=4",
      "train.global_batch_size=16"]),
]
# The suite's smoke run (any machine): a 2-layer model of 64-token sequences
SMOKE_CASES = [("smoke (2 layers, d128, seq 64)", "configs/tiny.yaml",
                [*FP32, "model.n_layers=2", "model.d_model=128", "model.n_heads=4", "model.n_kv_heads=2",
                 "model.ffn_hidden=256", "train.seq_len=64", "train.micro_batch_size=4", "train.global_batch_size=8"])]
# On a GPU: the configs' own precision, eager, two micro-batches a step on one device
EAGER = ["train.compile=false"]
GPU_CASES = [
    ("dense 1B, 2 x (4 x 4096)", "configs/dense_1b.yaml", [*EAGER, "train.global_batch_size=8"]),
    ("dense 1B, AC full", "configs/dense_1b.yaml", [*EAGER, "train.global_batch_size=8",
                                                    "parallel.activation_checkpointing=full"]),
    ("dense 1B, AC selective", "configs/dense_1b.yaml", [*EAGER, "train.global_batch_size=8",
                                                         "parallel.activation_checkpointing=selective"]),
    ("paper MoE sdd, 2 x (1 x 4096)", "configs/paper/moe_sdd.yaml", [*EAGER, "train.global_batch_size=2"]),
]


def measure(config: str, overrides: list[str], device: str = "cpu") -> int:
    from sdd_train.distributed.world import close_world, init_world
    from sdd_train.plan.measured import measured_peak

    cfg = load_config(config, overrides)
    world = init_world(device, cfg.parallel)
    try:
        peak = measured_peak(cfg, world)
        if world.is_main:
            print(json.dumps({"peak": peak}))
        return peak
    finally:
        close_world()


def measured(config: str, overrides: list[str], ranks: int) -> int:
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={ranks}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    out = subprocess.run([*launcher, __file__, "--measure", config, *overrides], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", nargs=argparse.REMAINDER, metavar="CONFIG", help="measure one peak and exit")
    parser.add_argument("--ranks", default="1,2", help="world sizes to compare (default 1,2)")
    parser.add_argument("--cases", help="only the cases whose label contains this text")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the GPU cases on one device, measured in this process by the caching allocator")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="one small case on one process (checks the script)")
    args = parser.parse_args()
    if args.measure:
        measure(args.measure[0], args.measure[1:])
        return
    from sdd_train.plan.memory import estimate_memory

    cases, ranks_list = (GPU_CASES, [1]) if args.device == "cuda" else (CASES, [int(r) for r in args.ranks.split(",")])
    if args.smoke:
        cases, ranks_list = SMOKE_CASES, [1]
    print("| case | ranks | estimated peak (MiB) | measured peak (MiB) | error |")
    print("|---|---|---|---|---|")
    rows = []
    for label, config, overrides in (c for c in cases if args.cases is None or args.cases in c[0]):
        for ranks in ranks_list:
            estimate = estimate_memory(load_config(config, overrides), ranks).peak
            real = measure(config, overrides, "cuda") if args.device == "cuda" else measured(config, overrides, ranks)
            rows.append({"case": label, "ranks": ranks, "estimate": estimate, "measured": real})
            print(f"| {label} | {ranks} | {estimate / MIB:,.1f} | {real / MIB:,.1f} | {estimate / real - 1:+.1%} |",
                  flush=True)
    if args.json:
        write_json(args.json, device=args.device, rows=rows)


if __name__ == "__main__":
    main()
