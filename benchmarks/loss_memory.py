"""Peak memory and time of the LM head + loss: plain logits vs the chunked fused path (CPU or GPU).

    python benchmarks/loss_memory.py [--tokens 4096] [--d-model 1024] [--vocab 100352] [--chunk 1024] \
        [--json runs/bench_loss_memory.json]

Each path runs forward + backward once for warm-up and once timed, in its own process (peak
resident memory on CPU, peak allocated memory on CUDA, above what the inputs take).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdd_train.kernels import linear_cross_entropy, lm_loss  # noqa: E402
from benchmarks.record import write_json  # noqa: E402


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(path: str, tokens: int, d: int, vocab: int, chunk: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    hidden = torch.randn(tokens, d, device=device, requires_grad=True)
    weight = (torch.randn(vocab, d, device=device) * d**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device)
    base = peak_bytes(device)

    def step() -> float:
        if path == "plain":
            loss, _, _ = lm_loss(hidden @ weight.t(), targets, 1e-4)
        else:
            loss, _, _ = linear_cross_entropy(hidden, weight, targets, 1e-4, chunk)
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.item()

    step()
    start = time.perf_counter()
    loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"path": path, "seconds": time.perf_counter() - start, "peak_gib": (peak_bytes(device) - base) / 2**30,
            "loss": loss, "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=100352)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--json", default="runs/bench_loss_memory.json")
    parser.add_argument("--path", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        print(json.dumps(measure(args.path, args.tokens, args.d_model, args.vocab, args.chunk)))
        return
    print(f"{args.tokens} tokens x d {args.d_model} -> vocab {args.vocab}, chunk {args.chunk}")
    print(f"{'path':<8} {'time (s)':>9} {'peak (GiB)':>11} {'loss':>9}")
    rows = []
    for path in ("plain", "chunked"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--path", path], capture_output=True,
                             text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['path']:<8} {r['seconds']:>9.3f} {r['peak_gib']:>11.2f} {r['loss']:>9.4f}")
        rows.append(r)
    write_json(args.json, tokens=args.tokens, d_model=args.d_model, vocab=args.vocab, chunk=args.chunk, rows=rows)


if __name__ == "__main__":
    main()
