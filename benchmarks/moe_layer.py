"""MoE layer forward+backward: our dispatch (grouped GEMM / per-expert loop) vs a naive per-token loop.

    python benchmarks/moe_layer.py [--tokens 1024] [--d-model 256] [--hidden 128] [--experts 64] [--top-k 8]

The naive baseline is what a first implementation does: for every token, run its k experts one by
one. Reports the median of ``--repeats`` timed calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdd_train.config import ModelConfig, MoEConfig  # noqa: E402
from sdd_train.model.moe import MoE  # noqa: E402
from benchmarks.record import write_json  # noqa: E402


def naive(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    logits, _, weights, experts = layer.route(x)
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for w, e in zip(weights[t], experts[t].tolist()):
            up, gate = (x[t] @ layer.ff_proj.weight[e].t()).chunk(2)
            acc = acc + w * (layer.ff_out.weight[e] @ (F.silu(gate) * up))
        rows.append(acc)
    return torch.stack(rows)


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="runs/bench_moe.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    rows = []
    for mode in ("auto", "loop", "naive"):
        cfg = ModelConfig(d_model=args.d_model, n_heads=4, n_kv_heads=4, ffn="moe",
                          moe=MoEConfig(n_experts=args.experts, top_k=args.top_k, expert_hidden=args.hidden,
                                        grouped_mm="loop" if mode == "loop" else "auto"))
        layer = MoE(cfg, sdd=False)
        for p in layer.parameters():
            torch.nn.init.normal_(p, 0, 0.02)
        x = torch.randn(args.tokens, args.d_model, requires_grad=True)

        def step() -> None:
            y = naive(layer, x) if mode == "naive" else layer(x)
            y.sum().backward()

        rows.append({"mode": {"auto": "grouped_mm", "loop": "per-expert loop", "naive": "naive per-token"}[mode],
                     "seconds": timed(step, args.repeats if mode != "naive" else 1)})
    naive_s = rows[-1]["seconds"]
    print(f"\nMoE fwd+bwd, {args.tokens} tokens, d {args.d_model}, {args.experts} experts x {args.hidden}, "
          f"top-{args.top_k}, fp32, {torch.get_num_threads()} threads")
    for r in rows:
        r["speedup_vs_naive"] = naive_s / r["seconds"]
        print(f"{r['mode']:<18} {r['seconds'] * 1e3:>9.1f} ms  {r['speedup_vs_naive']:>6.1f}x")
    write_json(args.json, args=vars(args), rows=rows)


if __name__ == "__main__":
    main()
