"""``sdd-data``: train a tokenizer, prepare token shards, inspect a prepared dataset.

    sdd-data tokenizer INPUT... --out tok.model [--vocab-size 32000] [--model-type bpe|unigram]
    sdd-data prepare INPUT... --tokenizer tok.model --out DATASET_DIR [--workers N] [--text-field text]
    sdd-data inspect DATASET_DIR [--sample 200]

INPUT: files, directories, globs (quote them), JSONL/JSON/Parquet files, a saved Hugging Face
dataset directory, or a hub name (with a network). Exit codes: 0 ok, 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdd_train.data.sources import FORMATS, DataError, iter_documents, list_units
from sdd_train.exit_codes import EXIT_OK, report_usage_error


def _input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="files, directories, globs, Hugging Face dataset dirs or hub names")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="auto: by extension; text: one document per file; lines: one per line; jsonl/json/parquet/hf")
    p.add_argument("--text-field", default="text", help="field/column holding the text (JSON, Parquet, HF)")
    p.add_argument("--utf8-errors", default="fail", choices=["fail", "replace"],
                   help="invalid UTF-8: stop with the file and offset, or replace with U+FFFD")
    p.add_argument("--hf-split", default="train", help="split of a Hugging Face DatasetDict")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sdd-data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="train a sentencepiece tokenizer (BPE or unigram)")
    _input_args(tok)
    tok.add_argument("--out", required=True, help="output .model path (a .vocab file is written beside it)")
    tok.add_argument("--vocab-size", type=int, default=32000)
    tok.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    tok.add_argument("--no-byte-fallback", action="store_true", help="unknown characters become <unk> (lossy)")
    tok.add_argument("--special", action="append", default=[], help="extra special token (repeatable)")
    tok.add_argument("--max-sentences", type=int, default=1_000_000, help="lines sampled for training")

    prep = sub.add_parser("prepare", help="tokenize inputs into token shards (resumable)")
    _input_args(prep)
    prep.add_argument("--tokenizer", required=True, help="a sentencepiece .model (from 'sdd-data tokenizer' or your own)")
    prep.add_argument("--out", required=True, help="dataset directory")
    prep.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation")
    prep.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    prep.add_argument("--overwrite", action="store_true", help="replace a dataset prepared from other inputs")

    ins = sub.add_parser("inspect", help="print counts and a decoded sample of a prepared dataset")
    ins.add_argument("dataset")
    ins.add_argument("--sample", type=int, default=200, help="tokens of the first training document to decode")
    return parser.parse_args(argv)


def _documents(args: argparse.Namespace):
    for unit in list_units(args.inputs, args.format, hf_split=args.hf_split):
        yield from iter_documents(unit, args.text_field, args.utf8_errors, args.hf_split)


def run(args: argparse.Namespace) -> None:
    if args.command == "tokenizer":
        from sdd_train.data.tokenizer import Tokenizer, train_tokenizer

        out = Path(args.out)
        prefix = out.with_suffix("") if out.suffix == ".model" else out
        model = train_tokenizer(_documents(args), prefix, args.vocab_size, args.model_type,
                                byte_fallback=not args.no_byte_fallback, special_tokens=tuple(args.special),
                                max_sentences=args.max_sentences)
        tok = Tokenizer(model)
        print(f"tokenizer: {model} ({tok.vocab_size} pieces, {args.model_type}, fingerprint {tok.fingerprint})")
    elif args.command == "prepare":
        from sdd_train.data.prepare import PrepareOptions, prepare

        if not 0 <= args.val_fraction < 1:
            raise DataError(f"--val-fraction: must be in [0, 1), got {args.val_fraction}")
        if not Path(args.tokenizer).is_file():
            raise DataError(f"--tokenizer: {args.tokenizer} not found; train one with 'sdd-data tokenizer'")
        opts = PrepareOptions(text_field=args.text_field, utf8_errors=args.utf8_errors,
                              val_fraction=args.val_fraction, hf_split=args.hf_split)
        prepare(args.inputs, Path(args.tokenizer), Path(args.out), args.format, opts, workers=args.workers,
                overwrite=args.overwrite)
    else:
        inspect(Path(args.dataset), args.sample)


def inspect(path: Path, sample: int) -> None:
    from sdd_train.data.dataset import PreparedDataset

    ds = PreparedDataset(path)
    m = ds.meta
    print(f"dataset: {path}")
    print(f"tokenizer: {m['tokenizer']['vocab_size']} pieces, fingerprint {m['tokenizer']['fingerprint']},"
          f" dtype {m['dtype']}")
    print(f"inputs: {', '.join(m['inputs'])} ({m['units']} units, text field '{m['text_field']}')")
    for name in ("train", "val"):
        s = m["splits"][name]
        print(f"{name}: {s['tokens']:,} tokens, {s['documents']:,} documents, {len(s['shards'])} shards")
    head = ds.train.read(0, min(sample, len(ds.train)))
    eos = [i for i, t in enumerate(head) if t == ds.tokenizer.eos_id]
    text = ds.tokenizer.decode(head[: eos[0]] if eos else head)
    print(f"sample (first training document, up to {sample} tokens):\n{text}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError) as e:  # DataError is a ValueError (a UsageError)
        return report_usage_error(e)
    return EXIT_OK


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
