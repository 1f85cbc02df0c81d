"""Preparation throughput (tokens/s of ``sdd-data prepare``) and loader throughput (tokens/s of batches).

    python benchmarks/data_throughput.py [INPUT ...] [--format lines] [--workers 2] [--vocab-size 32000]

INPUT defaults to this Python's standard-library sources (every machine has them). A tokenizer is
trained first (not timed); then preparation runs from scratch into a temporary directory, and the
loader reads ``--batches`` global batches of the tiny config's shape from the result.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdd_train.data.corpus import stdlib_files  # noqa: E402
from sdd_train.data.dataset import PreparedDataset  # noqa: E402
from sdd_train.data.loader import MixtureLoader  # noqa: E402
from sdd_train.data.prepare import PrepareOptions, prepare  # noqa: E402
from sdd_train.data.sources import iter_documents, list_units  # noqa: E402
from sdd_train.data.tokenizer import train_tokenizer  # noqa: E402
from benchmarks.record import write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*")
    parser.add_argument("--format", default="auto")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--doc-mask", action="store_true")
    parser.add_argument("--json", default="runs/bench_data.json")
    args = parser.parse_args()
    inputs = args.inputs or [str(p) for p in stdlib_files(64_000_000)]
    fmt = args.format if args.inputs else "text"

    with tempfile.TemporaryDirectory() as tmp:
        units = list_units(inputs, fmt)
        docs = (d for u in units for d in iter_documents(u, utf8_errors="replace"))
        tokenizer = train_tokenizer(docs, Path(tmp) / "tok", args.vocab_size, max_sentences=300_000)
        start = time.perf_counter()
        meta = prepare(inputs, tokenizer, Path(tmp) / "ds", fmt, PrepareOptions(utf8_errors="replace"),
                       workers=args.workers, progress=False, log=lambda *_: None)
        prep_s = time.perf_counter() - start
        tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
        in_bytes = sum(Path(u.path).stat().st_size for u in units if Path(u.path).is_file())

        ds = PreparedDataset(Path(tmp) / "ds")
        loader = MixtureLoader([ds.train], [1.0], args.seq_len, 0, ds.tokenizer.eos_id, doc_mask=args.doc_mask)
        start = time.perf_counter()
        for step in range(args.batches):
            loader.batch(step * args.global_batch, 0, args.global_batch)
        load_s = time.perf_counter() - start
    load_tok_s = args.batches * args.global_batch * args.seq_len / load_s
    result = {
        "inputs": f"{len(inputs)} input(s), {in_bytes / 1e6:.1f} MB", "format": fmt, "workers": args.workers,
        "vocab_size": args.vocab_size, "tokens": tokens, "prepare_s": prep_s, "prepare_tokens_per_s": tokens / prep_s,
        "prepare_mb_per_s": in_bytes / 1e6 / prep_s, "loader_tokens_per_s": load_tok_s,
        "loader_shape": f"{args.global_batch} x {args.seq_len}", "doc_mask": args.doc_mask,
    }
    print(f"prepare: {tokens:,} tokens from {result['inputs']} in {prep_s:.2f} s with {args.workers} workers:"
          f" {tokens / prep_s:,.0f} tokens/s ({result['prepare_mb_per_s']:.1f} MB/s)")
    print(f"loader: {load_tok_s:,.0f} tokens/s ({args.batches} batches of {result['loader_shape']})")
    write_json(args.json, **result)


if __name__ == "__main__":
    main()
