"""Text generation: greedy or sampled (temperature, top-k, top-p), stop strings, batched, with a KV cache.

``sdd-generate RUN_DIR --prompt "def main(" [--max-new-tokens 64] [--temperature 0.8 --top-p 0.9]``
works for every block scheme and MoE. Prompts of different lengths are left-padded; RoPE only
sees relative positions and padded keys are masked, so each row decodes as if it were alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sdd_train.exit_codes import EXIT_OK, UsageError, report_usage_error
from sdd_train.model import Transformer


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    stop: list[str] = field(default_factory=list)  # stop strings (the output is cut before them)
    seed: int = 0


def next_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits of the last position -> [B] token ids."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model: Transformer, prompts: list[list[int]], s: Sampling, eos_id: int | None = None,
                 stopped: Callable[[int, list[int]], bool] | None = None, use_cache: bool = True) -> list[list[int]]:
    """The new tokens for each prompt (a row ends at EOS, excluded, or when ``stopped(row, new)`` says so).

    Prompts longer than ``max_seq_len - max_new_tokens`` keep their last tokens.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.embed.weight.device
    budget = model.cfg.max_seq_len - s.max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens {s.max_new_tokens} leaves no room for a prompt in max_seq_len"
                         f" {model.cfg.max_seq_len}")
    prompts = [p[-budget:] for p in prompts]
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):  # left padding
        tokens[i, width - len(p):] = torch.tensor(p, device=device)
        valid[i, width - len(p):] = True
    generator = torch.Generator(device=device).manual_seed(s.seed) if s.temperature > 0 else None
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    cache = None
    if use_cache:
        cache = model.new_cache(len(prompts), width + s.max_new_tokens)
        cache.valid[:, :width] = valid
        logits = model(tokens, cache=cache)[:, -1]
    for _ in range(s.max_new_tokens):
        if cache is None:  # recompute everything; padding is kept out by a document mask
            doc_ids = torch.where(valid, 0, -1)
            logits = model(tokens, doc_ids)[:, -1]
        new = next_token(logits, s, generator)
        for i, t in enumerate(new.tolist()):
            if done[i]:
                continue
            if eos_id is not None and t == eos_id:
                done[i] = True
                continue
            out[i].append(t)
            if stopped is not None and stopped(i, out[i]):
                done[i] = True
        if all(done):
            break
        tokens = torch.cat([tokens, new[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
        if cache is not None:
            logits = model(new[:, None], cache=cache)[:, -1]
    return out


def complete(model: Transformer, tokenizer, prompts: list[str], s: Sampling, use_cache: bool = True) -> list[str]:
    """Text continuations of ``prompts``, cut before the first stop string."""

    def stopped(row: int, new: list[int]) -> bool:
        return bool(s.stop) and any(x in tokenizer.decode(new) for x in s.stop)

    ids = generate_ids(model, [tokenizer.encode(p) for p in prompts], s, tokenizer.eos_id, stopped, use_cache)
    texts = []
    for new in ids:
        text = tokenizer.decode(new)
        cut = min((text.index(x) for x in s.stop if x in text), default=len(text))
        texts.append(text[:cut])
    return texts


def main(argv: list[str] | None = None) -> int:
    from sdd_train.eval.inference import load_model

    parser = argparse.ArgumentParser(prog="sdd-generate", description="Generate text from a trained model.")
    parser.add_argument("path", help="run directory, checkpoint directory or sdd-export folder")
    parser.add_argument("--prompt", action="append", required=True, help="repeatable; prompts run as one batch")
    parser.add_argument("--step", type=int, help="checkpoint step of a run directory (default: the latest)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        return report_usage_error(UsageError("need --max-new-tokens >= 1, --temperature >= 0, --top-k >= 0,"
                                             " 0 < --top-p <= 1"))
    try:
        loaded = load_model(args.path, args.step, args.device)
        s = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.stop, args.seed)
        texts = complete(loaded.model, loaded.tokenizer, args.prompt, s, use_cache=not args.no_cache)
    except ValueError as e:  # a UsageError (config, checkpoint, ...), or prompts that do not fit (generate_ids)
        return report_usage_error(e)
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}")
        if len(texts) > 1:
            print("-" * 40)
    return EXIT_OK


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
