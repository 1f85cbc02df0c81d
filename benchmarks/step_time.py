"""Training-step time of the tiny config per block scheme, eager and compiled (CPU or GPU).

    python benchmarks/step_time.py [--blocks pre sdd] [--precision bf16] [--steps 5] [--json out.json]

One step = a full optimizer step of the config's global batch (forward, backward over all
micro-batches, clip, AdamW). Reports the median of ``--steps`` timed steps after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdd_train.config import load_config  # noqa: E402
from sdd_train.model import Transformer  # noqa: E402
from sdd_train.train.loss import lm_loss  # noqa: E402
from sdd_train.train.optim import build_optimizer  # noqa: E402
from sdd_train.train.distributed import init_world  # noqa: E402
from sdd_train.train.parallelize import apply_compile  # noqa: E402
from sdd_train.train.trainer import autocast  # noqa: E402


def time_steps(config: str, block: str, compiled: bool, precision: str, steps: int, warmup: int) -> dict:
    cfg = load_config(config, [f"model.block={block}", f"train.precision={precision}"])
    t = cfg.train
    device = init_world(t.device).device
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    if compiled:
        apply_compile(model)
    optimizer = build_optimizer(model, cfg.optim)
    accum = t.global_batch_size // t.micro_batch_size
    batches = [torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), device=device)
               for _ in range(accum)]

    def step() -> None:
        for batch in batches:
            with autocast(device, precision):
                logits = model(batch[:, :-1])
            loss, _, _ = lm_loss(logits, batch[:, 1:])
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tokens = t.global_batch_size * t.seq_len
    return {"block": block, "compiled": compiled, "precision": precision, "step_s": median,
            "tokens_per_sec": tokens / median, "warmup_s": warmup_s, "tokens_per_step": tokens,
            "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--blocks", nargs="+", default=["pre", "sdd"])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default="runs/bench_step_time.json")
    args = parser.parse_args()

    rows = [time_steps(args.config, block, mode == "compiled", args.precision, args.steps, args.warmup)
            for mode in args.modes for block in args.blocks]
    base = {r["compiled"]: r["step_s"] for r in rows if r["block"] == args.blocks[0]}
    print(f"\n{'block':<10} {'mode':<9} {'step (s)':>9} {'tokens/s':>10} {'vs ' + args.blocks[0]:>8}")
    for r in rows:
        mode = "compiled" if r["compiled"] else "eager"
        print(f"{r['block']:<10} {mode:<9} {r['step_s']:>9.3f} {r['tokens_per_sec']:>10,.0f}"
              f" {r['step_s'] / base[r['compiled']]:>8.2f}x")
    out = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "config": args.config, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
