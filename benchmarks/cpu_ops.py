"""CPU building blocks at the tiny config's micro-batch (16 x 256 tokens), forward + backward (the
optimizer: one step), each next to the plain PyTorch alternative it replaces, interleaved round by
round:

- attention (4 query / 2 kv heads of 64): ``sdd_train.kernels.cpu_attention`` vs SDPA's CPU kernel,
  both inside ``bf16_products_of_bf16_values`` as the trainer runs a bf16 step, and ours outside it;
  the same with a document mask (``data.doc_mask``: documents of 64 tokens), ours vs SDPA's dense mask;
- RMSNorm x gain on bf16 rows (block width 256, SDD up+gate width 1,376): the eager CPU kernel
  (``sdd_train.kernels.cpu_rms_norm``) and the PyTorch-path norm (hand-written backward, rows in
  cache-sized blocks; what compiled graphs fuse) vs the composite ops under autograd;
- the SDD feed-forward's norm + SwiGLU (up+gate width 1,376 -> 688): ``sdd_train.kernels.cpu_sdd_swiglu``
  vs the PyTorch-path norm then ``silu(gate) * up`` under bf16 autocast, eager and compiled;
- LM head + loss (vocabulary 8,192): the chunked fused path, with its softmax gradient compiled (as
  a compiled model runs it) and eager, vs plain logits + cross-entropy;
- AdamW step over the tiny model's parameters: ``fused=True`` (as the trainer builds it) vs the
  default per-tensor loop.

    python benchmarks/cpu_ops.py [--reps 15] [--json runs/bench_cpu_ops.json] [--smoke]

Runs in a CPU world (``init_world('cpu')``), so glibc malloc keeps freed memory as in training;
``SDD_TRAIN_CPU_MALLOC=system`` shows the default allocator. ``--smoke``: tiny shapes, to check
the script, not to measure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdd_train.config import load_config  # noqa: E402
from sdd_train.kernels.attention import document_mask  # noqa: E402
from sdd_train.kernels.cpu_attention import cpu_causal_attention  # noqa: E402
from sdd_train.kernels.cpu_rms_norm import cpu_rms_norm  # noqa: E402
from sdd_train.kernels.cpu_sdd_swiglu import sdd_swiglu  # noqa: E402
from sdd_train.kernels.precision import bf16_products_of_bf16_values  # noqa: E402
from sdd_train.model import Transformer  # noqa: E402
from sdd_train.distributed.world import init_world  # noqa: E402
from sdd_train.kernels import linear_cross_entropy, lm_loss, rms_norm_torch  # noqa: E402
from sdd_train.train.optim import build_optimizer  # noqa: E402
from benchmarks.record import write_json  # noqa: E402

Step = Callable[[], None]


def composite_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The textbook PyTorch RMSNorm (what autograd differentiates op by op)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def attention_cases(b: int, s: int) -> dict[str, Step]:
    q = torch.randn(b, s, 4, 64, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(b, s, 2 * 2 * 64, dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(b, s, 4, 64, dtype=torch.bfloat16)

    def views() -> tuple[torch.Tensor, torch.Tensor]:
        k, v = kv.split(128, dim=-1)  # strided slices of a fused projection, as in the model
        return k.unflatten(-1, (2, 64)), v.unflatten(-1, (2, 64))

    def ours() -> None:
        with bf16_products_of_bf16_values(q.device):
            cpu_causal_attention(q, *views()).backward(dout)

    def ours_default_products() -> None:  # fp32 products where PyTorch sends them by default (MKL on x86)
        cpu_causal_attention(q, *views()).backward(dout)

    def sdpa(mask: torch.Tensor | None = None) -> None:
        k, v = views()
        causal = {"is_causal": True} if mask is None else {"attn_mask": mask}
        with bf16_products_of_bf16_values(q.device):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 enable_gqa=True, **causal)
            out.transpose(1, 2).backward(dout)

    mask = document_mask(torch.arange(s).div(64, rounding_mode="floor").expand(b, s))

    def ours_documents() -> None:
        with bf16_products_of_bf16_values(q.device):
            cpu_causal_attention(q, *views(), mask).backward(dout)

    return {"attention: cpu_attention": ours, "attention: same, default fp32 products": ours_default_products,
            "attention: SDPA": sdpa, "attention, documents: cpu_attention": ours_documents,
            "attention, documents: SDPA dense mask": lambda: sdpa(mask)}


def norm_cases(rows: int, width: int) -> dict[str, Step]:
    x = (torch.randn(rows, width) * 3).to(torch.bfloat16).requires_grad_()
    weight = (torch.rand(width) + 0.5).requires_grad_()
    dy = torch.randn(rows, width, dtype=torch.bfloat16)
    return {f"norm {width}: C kernel (eager)": lambda: cpu_rms_norm(x, weight, 1e-5).backward(dy),
            f"norm {width}: rms_norm_torch": lambda: rms_norm_torch(x, weight, 1e-5).backward(dy),
            f"norm {width}: composite": lambda: composite_rms_norm(x, weight, 1e-5).backward(dy)}


def swiglu_cases(rows: int, width: int) -> dict[str, Step]:
    x = (torch.randn(rows, width) * 3).to(torch.bfloat16).requires_grad_()
    weight = (torch.rand(width) + 0.5).requires_grad_()
    dh = torch.randn(rows, width // 2, dtype=torch.bfloat16)

    def pytorch_path(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16):
            up, gate = rms_norm_torch(x, weight, 1e-5).chunk(2, dim=-1)
            return F.silu(gate) * up

    compiled = torch.compile(pytorch_path, dynamic=False)
    return {f"SDD SwiGLU {width}: C kernel": lambda: sdd_swiglu(x, weight, 1e-5).backward(dh),
            f"SDD SwiGLU {width}: PyTorch, compiled": lambda: compiled(x, weight).backward(dh),
            f"SDD SwiGLU {width}: PyTorch": lambda: pytorch_path(x, weight).backward(dh)}


def loss_cases(tokens: int, vocab: int) -> dict[str, Step]:
    hidden = torch.randn(tokens, 256, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, 256) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))

    def plain() -> None:
        with torch.autocast("cpu", torch.bfloat16):
            loss = lm_loss(F.linear(hidden, weight), targets)[0]
        loss.backward()

    def chunked(compiled: bool) -> Step:
        def step() -> None:
            with torch.autocast("cpu", torch.bfloat16):
                loss = linear_cross_entropy(hidden, weight, targets, 0.0, 4096, compiled=compiled)[0]
            loss.backward()
        return step

    return {"head + loss: chunked, compiled softmax": chunked(True), "head + loss: chunked (4,096)": chunked(False),
            "head + loss: plain": plain}


def optimizer_cases(config: str, smoke: bool) -> dict[str, Step]:
    smaller = ["model.n_layers=1", "model.vocab_size=512", "data.tokenizer_vocab_size=512"]
    cfg = load_config(config, smaller if smoke else [])
    model = Transformer(cfg.model)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    fused = build_optimizer(model, cfg.optim)
    loop = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, foreach=False)
    return {"AdamW step: fused": fused.step, "AdamW step: per-tensor loop": loop.step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--json", default="runs/bench_cpu_ops.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the script, not the speed")
    parser.add_argument("--config", default="configs/tiny.yaml", help="the model and optimizer of the AdamW cases")
    args = parser.parse_args(argv)
    init_world("cpu")
    torch.manual_seed(0)
    b, s, vocab = (2, 16, 64) if args.smoke else (16, 256, 8192)
    cases = {**attention_cases(b, s), **norm_cases(b * s, 256), **norm_cases(b * s, 1376),
             **swiglu_cases(b * s, 1376),
             **loss_cases(b * s, vocab), **optimizer_cases(args.config, args.smoke)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for step in cases.values():
        step()  # warm-up
    for _ in range(args.reps):
        for name, step in cases.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    rows = [{"case": name, "median_ms": statistics.median(t) * 1e3, "fastest_ms": min(t) * 1e3}
            for name, t in times.items()]
    print(f"{'case':<40} {'median (ms)':>12} {'fastest':>8}")
    for r in rows:
        print(f"{r['case']:<40} {r['median_ms']:>12.2f} {r['fastest_ms']:>8.2f}")
    write_json(args.json, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
