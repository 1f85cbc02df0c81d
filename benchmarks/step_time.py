"""Training-step time per block scheme, eager and compiled (CPU or GPU), side by side with
Hugging Face transformers' ``Olmo2ForCausalLM`` of the same shape (and, with ``--peers``, OLMo-core's
and torchtitan's transformers: benchmarks/peers.py).

    python benchmarks/step_time.py [--blocks pre sdd] [--precision bf16] [--steps 5] [--json out.json]
    python benchmarks/step_time.py --config configs/dense_1b.yaml --blocks pre reordered sdd \
        --modes compiled --no-hf --set train.global_batch_size=8        # the GPU benchmark
    make bench-peers ARGS="--steps 10"   # --no-hf --peers olmo-core torchtitan, from .venv-peers

One step = a full optimizer step of the config's global batch (forward, backward over all
micro-batches, clip, AdamW), with the loss computed as the trainer does (the fused chunked head +
loss; ``train.loss_chunk_size=0``: logits, then the plain loss). Reports the median of ``--steps``
timed steps after warm-up, the rows' steps interleaved round by round (``--sequential``: one model
after another);
on CUDA also MFU (SPEC section 9: training FLOPs per token x tokens/s over the GPU's bf16 peak) and
peak memory. The ``hf-olmo2`` rows (skipped when transformers is not installed) build
Olmo2ForCausalLM with the config's width, depth, heads, FFN width, vocabulary and tied embeddings
(OLMo2 is our ``reordered`` scheme) and train it as a transformers user would: its own loss
(``labels``: fp32 logits, then cross-entropy), compiled decoder layers in the compiled mode, the
same optimizer and batches; ``--no-hf`` skips them. ``--peers olmo-core torchtitan`` adds those
frameworks' rows, built and trained the same way (what each one changes or cannot match: peers.py);
a peer whose package is missing is skipped with one line naming the extra. Every foreign row
(hf-olmo2, peers) runs the same AdamW (fused) and batches as ours, under the same autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdd_train.config import load_config  # noqa: E402
from sdd_train.kernels.precision import bf16_products_of_bf16_values  # noqa: E402
from sdd_train.model import Transformer  # noqa: E402
from sdd_train.train.optim import build_optimizer  # noqa: E402
from sdd_train.distributed.parallelize import apply_compile  # noqa: E402
from sdd_train.distributed.world import init_world  # noqa: E402
from sdd_train.kernels import autocast  # noqa: E402
from sdd_train.train.callbacks.speed import peak_tflops  # noqa: E402
from benchmarks.peers import PEERS  # noqa: E402
from benchmarks.record import write_json  # noqa: E402

HF_OLMO2 = "hf-olmo2"


class Candidate:
    """One row of the table: a model of ``block`` (a scheme of ours or a peer's name) with its
    optimizer, batches and training step."""

    def __init__(self, config: str, block: str, compiled: bool, precision: str, overrides: tuple[str, ...] = ()):
        self.peer = block in PEERS
        # a peer reads only the config's shape, which any scheme loads alike
        cfg = load_config(config, [*overrides, f"model.block={'reordered' if self.peer else block}",
                                   f"train.precision={precision}"])
        self.cfg, self.block, self.compiled, self.precision = cfg, block, compiled, precision
        t = cfg.train
        self.device = device = init_world(t.device).device
        torch.manual_seed(0)
        self.fused_loss = not self.peer and t.loss_chunk_size > 0
        if self.peer:
            self.model = PEERS[block].build(cfg.model, t.seq_len, device, compiled)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr,
                                               betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
                                               fused=True)
        else:
            self.model = Transformer(cfg.model).to(device)
            if compiled:
                apply_compile(self.model.parallel_plan())
            self.optimizer = build_optimizer(self.model, cfg.optim)
        self.accum = t.global_batch_size // t.micro_batch_size
        self.batches = [torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), device=device)
                        for _ in range(self.accum)]
        self.times: list[float] = []
        self.warmup_s = 0.0

    def step(self) -> None:
        t, model = self.cfg.train, self.model
        # as the trainer runs a bf16 step; checked exact for our model only (tests/test_precision.py), and
        # transformers' RoPE angles are fp32 products of values that are not bf16
        ours_bf16 = not self.peer and self.precision == "bf16"
        with bf16_products_of_bf16_values(self.device) if ours_bf16 else contextlib.nullcontext():
            for batch in self.batches:
                with autocast(self.device, self.precision):
                    if self.peer:
                        loss = model(batch[:, :-1], batch[:, 1:].contiguous())
                    else:  # as the trainer does it
                        loss = model(batch[:, :-1], targets=batch[:, 1:], z_loss=self.cfg.optim.z_loss,
                                     loss_chunk=t.loss_chunk_size).loss
                (loss / self.accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def warm_up(self, steps: int) -> None:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.warmup_s = time.perf_counter() - start
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def timed_step(self) -> None:
        start = time.perf_counter()
        self.step()
        self.times.append(time.perf_counter() - start)

    def row(self) -> dict:
        t, device = self.cfg.train, self.device
        median = statistics.median(self.times)
        tokens = t.global_batch_size * t.seq_len
        loss = self.block if self.peer else "fused-chunked" if self.fused_loss else "plain"
        row = {"block": self.block, "compiled": self.compiled, "precision": self.precision, "step_s": median,
               "step_times_s": self.times, "tokens_per_sec": tokens / median, "warmup_s": self.warmup_s,
               "tokens_per_step": tokens, "device": str(device), "loss": loss}
        if device.type == "cuda":
            peak = peak_tflops(t.peak_tflops, device)  # the trainer's: train.peak_tflops or the known GPU's
            flops = None if self.peer else self.model.flops_per_token(t.seq_len)
            row["mfu"] = flops * tokens / median / (peak * 1e12) if flops and peak else None
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            row["gpu"] = torch.cuda.get_device_name(device)
        return row


def measure(specs: list[tuple[str, bool]], args: argparse.Namespace) -> list[dict]:
    """Time every (block, compiled) candidate. Interleaved (default): all are built and warmed up,
    then each round times one step of each, so load from other processes on a shared machine
    hits every row alike. ``--sequential`` holds one model at a time (large models on one GPU)."""
    def build(block: str, compiled: bool) -> Candidate:
        return Candidate(args.config, block, compiled, args.precision, tuple(args.set))

    if args.sequential:
        rows = []
        for spec in specs:
            candidate = build(*spec)
            candidate.warm_up(args.warmup)
            for _ in range(args.steps):
                candidate.timed_step()
            rows.append(candidate.row())
            del candidate
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return rows
    candidates = [build(*spec) for spec in specs]
    for candidate in candidates:
        candidate.warm_up(args.warmup)
    for _ in range(args.steps):
        for candidate in candidates:
            candidate.timed_step()
    return [c.row() for c in candidates]


def available(names: list[str]) -> list[str]:
    """The foreign rows whose package is installed; one line for each that is not, naming how to get it."""
    missing = [name for name in names if not PEERS[name].installed()]
    for name in missing:
        print(f"{PEERS[name].package} is not installed: no {name} rows ({PEERS[name].install})")
    return [name for name in names if name not in missing]


def peer_ratios(rows: list[dict], interleaved: bool) -> list[dict]:
    """Each foreign row's step over each of our rows of the same mode: the ratio of the medians and,
    when interleaved, the median of the per-round ratios (steadier on a shared machine: a slow round
    slows both)."""
    ratios = []
    for peer in (r for r in rows if r["block"] in PEERS):
        for ours in (r for r in rows if r["block"] not in PEERS and r["compiled"] == peer["compiled"]):
            rounds = [a / b for a, b in zip(peer["step_times_s"], ours["step_times_s"])]
            ratios.append({"peer": peer["block"], "block": ours["block"],
                           "mode": "compiled" if peer["compiled"] else "eager",
                           "ratio_of_medians": peer["step_s"] / ours["step_s"],
                           "median_of_round_ratios": statistics.median(rounds) if interleaved else None})
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--blocks", nargs="+", default=["pre", "sdd"])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default="runs/bench_step_time.json")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' Olmo2ForCausalLM")
    parser.add_argument("--peers", nargs="*", default=[], choices=[n for n in PEERS if n != HF_OLMO2],
                        help="other frameworks' transformers at the same shape (benchmarks/peers.py)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--gpu-only", action="store_true", help="without CUDA print that it was skipped, exit 0")
    parser.add_argument("--sequential", action="store_true", help="one model at a time instead of interleaved steps")
    args = parser.parse_args()
    if args.gpu_only and not torch.cuda.is_available():
        print(f"step_time {args.config}: needs CUDA, skipped")
        return

    blocks = list(args.blocks) + available(([] if args.no_hf else [HF_OLMO2]) + args.peers)
    rows = measure([(block, mode == "compiled") for mode in args.modes for block in blocks], args)
    ratios = peer_ratios(rows, interleaved=not args.sequential)
    base = {r["compiled"]: r["step_s"] for r in rows if r["block"] == args.blocks[0]}
    foreign = [b for b in blocks if b in PEERS]
    step = {(r["block"], r["compiled"]): r["step_s"] for r in rows}
    gpu = "peak_mem_gib" in rows[0]
    print(f"\n{'block':<10} {'mode':<9} {'step (s)':>9} {'tokens/s':>10} {'vs ' + args.blocks[0]:>8}"
          + "".join(f" {name + ' / this':>18}" for name in foreign) + (f" {'MFU':>6} {'peak GiB':>9}" if gpu else ""))
    for r in rows:
        mode = "compiled" if r["compiled"] else "eager"
        speedup = "".join(f" {step[name, r['compiled']] / r['step_s']:>17.2f}x" for name in foreign)
        mfu = f" {r['mfu']:>6.1%}" if r.get("mfu") else f" {'-':>6}"
        memory = f"{mfu} {r['peak_mem_gib']:>9.1f}" if gpu else ""
        print(f"{r['block']:<10} {mode:<9} {r['step_s']:>9.3f} {r['tokens_per_sec']:>10,.0f}"
              f" {r['step_s'] / base[r['compiled']]:>8.2f}x{speedup}{memory}")
    if ratios and not args.sequential:
        print("\nmedian of the per-round ratios (the foreign step / ours, same round):")
        for q in ratios:
            print(f"  {q['peer']:<10} / {q['block']:<6} {q['mode']:<9} {q['median_of_round_ratios']:.2f}x")
    write_json(args.json, config=args.config, overrides=args.set, rows=rows, ratios=ratios)

if __name__ == "__main__":
    main()
