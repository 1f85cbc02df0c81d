"""Document-masked causal attention (``data.doc_mask``), forward + backward, per implementation that
runs on this device, interleaved round by round: which one ``model.attention_backend=auto`` should take.

- CUDA (the dense 1B shape: micro-batch 4 x 4096, 32 query / 8 kv heads of 64, documents of 512
  tokens): FlexAttention with a document block mask (compiled), SDPA with the dense mask (GQA with a
  mask runs only in its math backend), flash-attn's varlen kernel when installed (bf16 only).
- CPU (the tiny shape: 16 x 256, 4 / 2 heads of 64, documents of 64 tokens): the batched-matmul
  kernel (``sdd_train.kernels.cpu_attention``) vs SDPA with the dense mask. FlexAttention has no CPU
  backward, so it is not a CPU candidate.

    python benchmarks/doc_attention.py [--reps 10] [--dtype bf16|fp32] [--json runs/bench_doc_attention.json] [--smoke]

q, k, v are bf16 (``--dtype fp32``: fp32, what a CPU without native bf16 trains in). Each row: median
and fastest milliseconds, and the peak memory of one call on CUDA. ``--smoke`` runs
tiny shapes to check the script, not to measure.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdd_train.kernels import attention  # noqa: E402
from sdd_train.kernels.cpu_attention import cpu_causal_attention  # noqa: E402
from sdd_train.kernels.precision import DTYPES, bf16_products_of_bf16_values  # noqa: E402
from benchmarks.record import write_json  # noqa: E402


def cases(device: torch.device, smoke: bool, dtype: torch.dtype = torch.bfloat16) -> dict[str, Callable[[], None]]:
    cuda = device.type == "cuda"
    b, s, h, hkv, doc = ((4, 4096, 32, 8, 512) if cuda else (16, 256, 4, 2, 64)) if not smoke else (2, 32, 4, 2, 8)
    q = torch.randn(b, s, h, 64, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, s, hkv, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)
    doc_ids = torch.arange(s, device=device).div(doc, rounding_mode="floor").expand(b, s)
    dense = attention.document_mask(doc_ids)

    def run(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:  # a bf16 training step's setting (it would round fp32 products to bf16)
            with bf16_products_of_bf16_values(device) if dtype == torch.bfloat16 else contextlib.nullcontext():
                fn().backward(dout)
        return step

    out = {"SDPA, dense mask": run(lambda: attention.sdpa_causal_attention(q, k, v, dense))}
    if cuda:
        if attention.flex_attention_usable(q):
            blocks = attention.document_block_mask(doc_ids)
            out["FlexAttention, block mask"] = run(lambda: attention.flex_document_attention(q, k, v, blocks))
        if attention.flash_attn_usable(q) and dtype == torch.bfloat16:  # half precision only
            spans = attention.document_spans(doc_ids)
            out["flash-attn varlen"] = run(lambda: attention.causal_attention(q, k, v, "flash", spans))
    else:
        out["cpu_attention, document bias"] = run(lambda: cpu_causal_attention(q, k, v, dense))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", default="runs/bench_doc_attention.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the script, not the speed")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="q/k/v dtype (fp32: what a CPU without native bf16 trains in)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    steps = cases(device, args.smoke, DTYPES[args.dtype])
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, float] = {}
    for name, step in steps.items():  # warm-up (compiles FlexAttention), and one call's peak memory
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    for _ in range(1 if args.smoke else args.reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    rows = [{"case": name, "device": device.type, "dtype": args.dtype, "median_ms": statistics.median(t) * 1e3,
             "fastest_ms": min(t) * 1e3, "peak_gib": peaks.get(name)} for name, t in times.items()]
    print(f"{'case':<32} {'median (ms)':>12} {'fastest':>9} {'peak GiB':>9}")
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['case']:<32} {r['median_ms']:>12.2f} {r['fastest_ms']:>9.2f} {peak:>9}")
    write_json(args.json, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
