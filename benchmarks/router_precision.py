"""What routing on bf16 router logits (the reference's, under autocast) changes against ours in fp32.

    python benchmarks/router_precision.py RUN_DIR [--batches 4] [--json runs/bench_router_precision.json]

Runs the run's validation batches through its latest checkpoint (fp32) and, at every MoE layer, routes
the layer's input twice: logits from an fp32 product (ours: ``MoE.route``) and from a bf16 product of
bf16 operands (the reference's ``nn.Linear`` under bf16 autocast, its softmax upcast to fp32). Per
layer: the share of tokens whose chosen top-k experts differ, the largest change of a combine weight
where they do not, and the relative change of the load-balancing and router z-losses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.record import write_json  # noqa: E402
from sdd_train.eval.inference import load_model, local_run_data  # noqa: E402
from sdd_train.eval.validation import build_eval_sets  # noqa: E402


def compare(layer: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """fp32 routing against bf16 routing of the layer's input rows ``x`` [T, d]."""
    k = layer.top_k
    w = layer.router.weight
    results = {}
    for name, logits in (("fp32", F.linear(x, w)), ("bf16", F.linear(x.bfloat16(), w.bfloat16()).float())):
        probs = logits.softmax(-1)
        weights, experts = probs.topk(k, dim=-1)
        counts = torch.zeros(layer.n_experts).scatter_add(0, experts.reshape(-1), torch.ones(experts.numel()))
        lb = layer.n_experts / (k * x.shape[0]) * (counts * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).pow(2).mean()
        results[name] = (experts.sort(-1).values, weights, lb, z)
    (e32, w32, lb32, z32), (e16, w16, lb16, z16) = results["fp32"], results["bf16"]
    same = (e32 == e16).all(-1)
    return {"tokens": x.shape[0],
            "top-k differs": 1.0 - same.float().mean().item(),
            "weight change where it does not": (w32[same].sort(-1).values - w16[same].sort(-1).values).abs().max().item(),
            "lb loss change": ((lb16 - lb32) / lb32).item(),
            "z-loss change": ((z16 - z32) / z32).item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run directory (its latest checkpoint) or a checkpoint directory")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--json", default="runs/bench_router_precision.json")
    args = parser.parse_args()
    loaded = load_model(args.run)
    model, cfg = loaded.model, loaded.cfg
    layers = list(model.parallel_plan().expert_layers)
    if not layers:
        raise SystemExit(f"{args.run}: not an MoE model")
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    for i, layer in enumerate(layers):  # a benchmark's probe: record each MoE layer's input
        layer.register_forward_pre_hook(lambda mod, a, i=i: inputs[i].append(a[0].reshape(-1, a[0].shape[-1])))
    datasets, names = local_run_data(cfg)
    with torch.no_grad():
        for batch in build_eval_sets(cfg, datasets, names, args.batches)[0].batches:
            model(batch["inputs"], batch.get("doc_ids"))
        rows = [compare(layer, torch.cat(inputs[i])) for i, layer in enumerate(layers)]
    print(f"\nrouting on bf16 against fp32 logits: {args.run} ({loaded.source.name}), {rows[0]['tokens']:,} tokens,"
          f" {layers[0].n_experts} experts top-{layers[0].top_k}")
    keys = [k for k in rows[0] if k != "tokens"]
    print("| layer | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for i, row in enumerate(rows):
        print(f"| {i} | " + " | ".join(f"{row[k]:.2%}" if k == "top-k differs" else f"{row[k]:.1e}" for k in keys) + " |")
    write_json(args.json, run=str(args.run), checkpoint=str(loaded.source), rows=rows)


if __name__ == "__main__":
    main()
