"""Training-step time per block scheme, eager and compiled (CPU or GPU), side by side with
Hugging Face transformers' ``Olmo2ForCausalLM`` of the same shape.

    python benchmarks/step_time.py [--blocks pre sdd] [--precision bf16] [--steps 5] [--json out.json]
    python benchmarks/step_time.py --config configs/dense_1b.yaml --blocks pre reordered sdd \
        --modes compiled --no-hf --set train.global_batch_size=8        # the GPU benchmark

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
same optimizer and batches; ``--no-hf`` skips them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
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
from benchmarks.record import write_json  # noqa: E402


HF_OLMO2 = "hf-olmo2"


def olmo2_like(m) -> torch.nn.Module:
    """transformers' Olmo2ForCausalLM with the shape of model config ``m``; ``forward(tokens, targets)``
    returns its own loss."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    hf = Olmo2ForCausalLM(Olmo2Config(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_hidden, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings, pad_token_id=None, eos_token_id=None,
        use_cache=False))
    forward = hf.forward
    # shift_labels: the targets are already shifted (labels only switches the loss on)
    hf.forward = lambda tokens, targets: forward(input_ids=tokens, labels=targets, shift_labels=targets,
                                                 use_cache=False).loss
    return hf


class Candidate:
    """One row of the table: a model of ``block`` with its optimizer, batches and training step."""

    def __init__(self, config: str, block: str, compiled: bool, precision: str, overrides: tuple[str, ...] = ()):
        cfg = load_config(config, [*overrides, f"model.block={'reordered' if block == HF_OLMO2 else block}",
                                   f"train.precision={precision}"])
        self.cfg, self.block, self.compiled, self.precision = cfg, block, compiled, precision
        t = cfg.train
        self.device = device = init_world(t.device).device
        torch.manual_seed(0)
        self.fused_loss = block != HF_OLMO2 and t.loss_chunk_size > 0
        if block == HF_OLMO2:
            self.model = olmo2_like(cfg.model).to(device)
            if compiled:  # transformers' own compile target: the decoder layers
                for layer in self.model.model.layers:
                    layer.forward = torch.compile(layer.forward)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr,
                                               betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
                                               fused=device.type == "cuda")
        else:
            self.model = Transformer(cfg.model).to(device)
            if compiled:
                apply_compile(self.model)
            self.optimizer = build_optimizer(self.model, cfg.optim)
        self.accum = t.global_batch_size // t.micro_batch_size
        self.batches = [torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), device=device)
                        for _ in range(self.accum)]
        self.times: list[float] = []
        self.warmup_s = 0.0

    def step(self) -> None:
        t, model = self.cfg.train, self.model
        # as the trainer runs a bf16 step (not for transformers: its RoPE angles are fp32 products)
        ours_bf16 = self.block != HF_OLMO2 and self.precision == "bf16"
        with bf16_products_of_bf16_values(self.device) if ours_bf16 else contextlib.nullcontext():
            for batch in self.batches:
                with autocast(self.device, self.precision):
                    if self.block == HF_OLMO2:
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
        loss = "transformers" if self.block == HF_OLMO2 else "fused-chunked" if self.fused_loss else "plain"
        row = {"block": self.block, "compiled": self.compiled, "precision": self.precision, "step_s": median,
               "step_times_s": self.times, "tokens_per_sec": tokens / median, "warmup_s": self.warmup_s,
               "tokens_per_step": tokens, "device": str(device), "loss": loss}
        if device.type == "cuda":
            peak = peak_tflops(t.peak_tflops, device)  # the trainer's: train.peak_tflops or the known GPU's
            flops = self.model.flops_per_token(t.seq_len) if self.block != HF_OLMO2 else None
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
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--gpu-only", action="store_true", help="without CUDA print that it was skipped, exit 0")
    parser.add_argument("--sequential", action="store_true", help="one model at a time instead of interleaved steps")
    args = parser.parse_args()
    if args.gpu_only and not torch.cuda.is_available():
        print(f"step_time {args.config}: needs CUDA, skipped")
        return

    blocks = list(args.blocks)
    if not args.no_hf:
        if importlib.util.find_spec("transformers") is not None:
            blocks.append(HF_OLMO2)
        else:
            print("transformers is not installed: no hf-olmo2 rows (pip install transformers)")
    rows = measure([(block, mode == "compiled") for mode in args.modes for block in blocks], args)
    base = {r["compiled"]: r["step_s"] for r in rows if r["block"] == args.blocks[0]}
    hf = {r["compiled"]: r["step_s"] for r in rows if r["block"] == HF_OLMO2}
    gpu = "peak_mem_gib" in rows[0]
    print(f"\n{'block':<10} {'mode':<9} {'step (s)':>9} {'tokens/s':>10} {'vs ' + args.blocks[0]:>8}"
          + (f" {'hf-olmo2 / this':>16}" if hf else "") + (f" {'MFU':>6} {'peak GiB':>9}" if gpu else ""))
    for r in rows:
        mode = "compiled" if r["compiled"] else "eager"
        speedup = f" {hf[r['compiled']] / r['step_s']:>15.2f}x" if hf else ""
        mfu = f" {r['mfu']:>6.1%}" if r.get("mfu") else f" {'-':>6}"
        memory = f"{mfu} {r['peak_mem_gib']:>9.1f}" if gpu else ""
        print(f"{r['block']:<10} {mode:<9} {r['step_s']:>9.3f} {r['tokens_per_sec']:>10,.0f}"
              f" {r['step_s'] / base[r['compiled']]:>8.2f}x{speedup}{memory}")
    write_json(args.json, config=args.config, overrides=args.set, rows=rows)


if __name__ == "__main__":
    main()
