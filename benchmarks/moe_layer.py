"""MoE layer forward+backward: our dispatch (grouped GEMM / per-expert loop) vs a naive per-token loop;
under torchrun, expert parallelism's dispatch and compute time.

    python benchmarks/moe_layer.py [--tokens 1024] [--d-model 256] [--hidden 128] [--experts 64] [--top-k 8]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 benchmarks/moe_layer.py      # expert parallelism (gloo on CPU)

The naive baseline is what a first implementation does: for every token, run its k experts one by
one. Reports the median of ``--repeats`` timed calls after one warm-up call. Under torchrun each rank
routes ``--tokens`` tokens of its own through the layer with its experts split over the ranks
(sdd_train/distributed/expert_parallel.py); the all-to-all time (rows out and back, forward and
backward, with the count exchange) is read from the profiler, the rest is compute; for comparison, the
same layer with every expert on every rank, and the all-gather of the expert weights FSDP2 would do
instead of moving tokens.
"""

from __future__ import annotations

import argparse
import os
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


def moe_layer(args: argparse.Namespace, grouped_mm: str = "auto") -> MoE:
    cfg = ModelConfig(d_model=args.d_model, n_heads=4, n_kv_heads=4, ffn="moe",
                      moe=MoEConfig(n_experts=args.experts, top_k=args.top_k, expert_hidden=args.hidden,
                                    grouped_mm=grouped_mm))
    layer = MoE(cfg, sdd=False)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    return layer


def communication_seconds(step) -> float:
    """CPU time of one ``step`` spent in all-to-all collectives and waiting for them (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    names = ("all_to_all", "alltoall", "wait_tensor")
    return sum(e.self_cpu_time_total for e in prof.key_averages() if any(n in e.key for n in names)) / 1e6


def expert_parallel_main(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from sdd_train.distributed.dims import ParallelDims
    from sdd_train.distributed.expert_parallel import apply_expert_parallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    dims = ParallelDims(1, world, world, ep=world)
    torch.manual_seed(0)
    full, split = moe_layer(args), moe_layer(args)
    split.load_state_dict(full.state_dict())
    apply_expert_parallel([split], mesh, dims)
    torch.manual_seed(1 + rank)
    x = torch.randn(args.tokens, args.d_model, requires_grad=True)

    def step(layer: MoE):
        def run() -> None:
            layer(x)[0].sum().backward()
        return run

    def gather() -> None:
        for p in split.expert_params():
            if p is not None:
                p.full_tensor()

    results = {"every expert on every rank": timed(step(full), args.repeats),
               "expert parallel": timed(step(split), args.repeats)}
    comm = statistics.median(communication_seconds(step(split)) for _ in range(args.repeats))
    results["  of which all-to-all"] = comm
    results["  of which compute"] = results["expert parallel"] - comm
    results["all-gather of the expert weights"] = timed(gather, args.repeats)
    times = torch.tensor(list(results.values()), dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank's
    if rank == 0:
        print(f"\nMoE fwd+bwd under expert parallelism: {world} ranks x {args.tokens} tokens, d {args.d_model},"
              f" {args.experts} experts x {args.hidden} ({args.experts // world} per rank), top-{args.top_k}, fp32,"
              f" {torch.get_num_threads()} thread(s) per rank; slowest rank, median of {args.repeats}")
        for name, seconds in zip(results, times.tolist()):
            print(f"{name:<36} {seconds * 1e3:>9.1f} ms")
        write_json(args.json.replace(".json", "_ep.json"), args=vars(args), world=world,
                   rows=[{"mode": n, "seconds": t} for n, t in zip(results, times.tolist())])
    dist.destroy_process_group()


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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return expert_parallel_main(args)

    torch.manual_seed(0)
    rows = []
    for mode in ("auto", "loop", "naive"):
        layer = moe_layer(args, "loop" if mode == "loop" else "auto")
        x = torch.randn(args.tokens, args.d_model, requires_grad=True)

        def step() -> None:
            y = naive(layer, x) if mode == "naive" else layer(x)[0]
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
