"""Fused-norm microbenchmarks on the GPU: the Triton kernel vs the PyTorch path (eager and
torch.compile) vs a plain copy of the same tensor, at the dense 1B shapes (micro-batch 4 x 4096).

    python benchmarks/kernels.py [--json runs/bench_kernels.json]

Every case normalises bf16 rows with an fp32 gain. The forward reads and writes each element once,
like a copy, so ``fwd / copy`` is the kernel's distance from memory bandwidth (target <= 1.2);
forward + backward moves ~2.5 copies (x, y; then x, dy, dx). Without CUDA it prints that it was
skipped. ``--smoke`` runs tiny shapes on whatever device there is (with TRITON_INTERPRET=1 on a
CPU), to check the script itself, not to measure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdd_train.kernels import rms_norm_torch  # noqa: E402
from sdd_train.kernels.triton_rms_norm import fused_rms_norm, triton_available  # noqa: E402
from benchmarks.record import write_json  # noqa: E402

ROWS = 4 * 4096  # one micro-batch of the dense 1B recipe
# name, row shape, groups: every norm of the dense 1B SDD model
CASES = [
    ("block / QK-norm full (d 2048)", (ROWS, 2048), 1),
    ("QK-norm per head (32 x 128)", (ROWS, 32, 128), 1),
    ("SDD up+gate (16384)", (ROWS, 16384), 1),
    ("SDD up+gate per branch (2 x 8192)", (ROWS, 16384), 2),
]
SMOKE_CASES = [("smoke (d 96)", (8, 96), 1), ("smoke per branch", (8, 64), 2)]


def timer(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of ``fn``: CUDA events on the GPU (after a warm-up), wall clock elsewhere."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_case(name: str, shape: tuple[int, ...], groups: int, device: torch.device, reps: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=torch.bfloat16)
    weight = torch.rand(shape[-1], device=device) + 0.5
    dy = torch.randn_like(x)
    out = torch.empty_like(x)
    paths = {"triton": fused_rms_norm, "torch": rms_norm_torch}
    if device.type == "cuda":
        torch._dynamo.reset()  # a fresh compile per shape, never the recompile limit's eager fallback
        paths["compiled"] = torch.compile(rms_norm_torch)
    row: dict = {"case": name, "shape": list(shape), "groups": groups,
                 "copy_s": timer(lambda: out.copy_(x), device, reps)}
    for path, norm in paths.items():
        xg, wg = x.detach().requires_grad_(), weight.detach().requires_grad_()

        def forward_backward(norm=norm, xg=xg, wg=wg) -> None:
            norm(xg, wg, 1e-5, groups).backward(dy)
            xg.grad = wg.grad = None

        row[f"{path}_fwd_s"] = timer(lambda norm=norm: norm(x, weight, 1e-5, groups), device, reps)
        row[f"{path}_fwd_bwd_s"] = timer(forward_backward, device, reps)
    row["fwd_vs_copy"] = row["triton_fwd_s"] / row["copy_s"]
    row["fwd_gbps"] = 2 * x.numel() * x.element_size() / row["triton_fwd_s"] / 1e9
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="runs/bench_kernels.json")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device (checks the script)")
    args = parser.parse_args(argv)
    if not triton_available():
        print("kernels: triton is not installed, skipped")
        return 0
    if not torch.cuda.is_available() and not args.smoke:
        print("kernels: needs CUDA, skipped (the kernels are tested on CPU in Triton's interpreter)")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = SMOKE_CASES if args.smoke else CASES
    rows = [bench_case(name, shape, groups, device, 2 if args.smoke else args.reps) for name, shape, groups in cases]
    paths = [p for p in ("triton", "torch", "compiled") if f"{p}_fwd_s" in rows[0]]
    print(f"\n{'case':<36} {'copy us':>8} " + " ".join(f"{p + ' fwd/f+b us':>22}" for p in paths)
          + f" {'fwd/copy':>9} {'GB/s':>7}")
    for r in rows:
        cells = " ".join(f"{r[p + '_fwd_s'] * 1e6:>10.1f}/{r[p + '_fwd_bwd_s'] * 1e6:>11.1f}" for p in paths)
        print(f"{r['case']:<36} {r['copy_s'] * 1e6:>8.1f} {cells} {r['fwd_vs_copy']:>9.2f} {r['fwd_gbps']:>7.0f}")
    write_json(args.json, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)", rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
