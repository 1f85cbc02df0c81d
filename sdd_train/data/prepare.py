"""Tokenize inputs into a prepared dataset: token shards + metadata, in several processes.

Layout of a prepared dataset directory::

    tokenizer.model         the tokenizer the shards were made with
    train/000012.bin        raw token ids (uint16, or uint32 for vocabularies > 65536), EOS after
    val/000012.bin          every document; one file per input unit and split
    units/000012.json       completion marker of unit 12 (counts, unit and tokenizer identity)
    metadata.json           written last: tokenizer fingerprint, vocab size, dtype, counts, shards

A shard is written under a ``.tmp`` name and renamed when complete, and its unit marker is
written after that, so an interrupted run never leaves a shard that looks complete; re-running
the same command skips finished units and produces byte-identical output. Whether a document is
held out for validation depends only on its text: a 64-bit hash of it below ``val_fraction x 2^64``
(and, where no document's is, the document with the smallest hash, so the val split is never
empty). The split does not change when the inputs move, are reordered or are cut into other
units, and exact duplicates never straddle train and val.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdd_train.data.sources import UNIT_BYTES, DataError, Unit, iter_documents, list_units, source_fingerprint
from sdd_train.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
SPLIT_RULE = "text-blake2b"  # recorded in unit markers with the threshold: a unit split otherwise is redone
SPLITS = ("train", "val")
ENCODE_BATCH = 512  # documents per sentencepiece call


@dataclass(frozen=True)
class PrepareOptions:
    text_field: str = "text"
    utf8_errors: str = "fail"  # fail | replace
    val_fraction: float = 0.01
    hf_split: str = "train"


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def text_hash(text: str) -> int:
    """The 64-bit hash of a document's text that decides its split: val when below the threshold."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def val_threshold(fraction: float) -> int:
    return int(fraction * 2**64)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


_TOKENIZER: Tokenizer | None = None  # one per worker process


def _tokenizer(model_file: str) -> Tokenizer:
    global _TOKENIZER
    if _TOKENIZER is None or str(_TOKENIZER.model_file) != model_file:
        _TOKENIZER = Tokenizer(model_file)
    return _TOKENIZER


def _prepare_unit(job: tuple[int, Unit, str, str, PrepareOptions, int]) -> dict:
    """Tokenize one unit into its train/val shards, documents whose text hashes below ``val_below``
    going to val (skipped when its marker says it is done so)."""
    index, unit, out, tokenizer_fp, opts, val_below = job
    out_dir = Path(out)
    marker = out_dir / "units" / f"{index:06d}.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if (done.get("unit"), done.get("tokenizer"), done.get("split"), done.get("val_below")) == \
                (unit.key, tokenizer_fp, SPLIT_RULE, val_below):
            return {**done, "skipped": True}
    tok = _tokenizer(str(out_dir / "tokenizer.model"))
    dtype = dtype_for(tok.vocab_size)
    files = {s: out_dir / s / f"{index:06d}.bin" for s in SPLITS}
    handles = {s: open(f.with_name(f.name + ".tmp"), "wb") for s, f in files.items()}
    counts = {s: {"tokens": 0, "documents": 0} for s in SPLITS}
    min_hash = None  # the unit's smallest text hash: where no document lands in val, the smallest is moved there
    try:
        batch: list[str] = []

        def flush() -> None:
            nonlocal min_hash
            for text, ids in zip(batch, tok.sp.encode(batch)):
                h = text_hash(text)
                min_hash = h if min_hash is None else min(min_hash, h)
                split = "val" if h < val_below else "train"
                arr = np.asarray(ids + [tok.eos_id], dtype=dtype)
                handles[split].write(arr.tobytes())
                counts[split]["tokens"] += arr.size
                counts[split]["documents"] += 1
            batch.clear()

        for doc in iter_documents(unit, opts.text_field, opts.utf8_errors, opts.hf_split):
            batch.append(doc)
            if len(batch) >= ENCODE_BATCH:
                flush()
        flush()
    finally:
        for h in handles.values():
            h.close()
    for s, f in files.items():
        os.replace(f.with_name(f.name + ".tmp"), f)
    result = {"unit": unit.key, "tokenizer": tokenizer_fp, "split": SPLIT_RULE, "val_below": val_below,
              "min_hash": min_hash, **{s: counts[s] for s in SPLITS}}
    _write_json(marker, result)
    return {**result, "skipped": False}


def prepare(inputs: list[str], tokenizer_model: Path, out: Path, fmt: str = "auto",
            opts: PrepareOptions = PrepareOptions(), workers: int | None = None, overwrite: bool = False,
            progress: bool = True, log=print, unit_bytes: int = UNIT_BYTES) -> dict:
    """Prepare ``inputs`` into ``out`` (resuming a previous run of the same command); return the metadata."""
    out = Path(out)
    tok = Tokenizer(tokenizer_model)
    units = list_units(inputs, fmt, unit_bytes=unit_bytes, hf_split=opts.hf_split)
    source_fp = source_fingerprint(units)
    meta_file = out / "metadata.json"
    if meta_file.is_file() and not overwrite:
        meta = json.loads(meta_file.read_text())
        if meta["source_fingerprint"] == source_fp and meta["tokenizer"]["fingerprint"] == tok.fingerprint \
                and meta["val_fraction"] == opts.val_fraction and meta["text_field"] == opts.text_field:
            log(f"data: {out} is already prepared from these inputs")
            return meta
        raise DataError(f"{out}: already holds a dataset prepared from other inputs or another tokenizer;"
                        " choose a new --out or pass --overwrite")
    if overwrite and out.exists():
        shutil.rmtree(out)
    existing_tok = out / "tokenizer.model"
    if existing_tok.is_file() and Tokenizer(existing_tok).fingerprint != tok.fingerprint:
        raise DataError(f"{out}: a partial preparation with a different tokenizer is there;"
                        " choose a new --out or pass --overwrite")
    for sub in (*SPLITS, "units"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if not existing_tok.is_file():
        shutil.copyfile(tokenizer_model, out / "tokenizer.model.tmp")
        os.replace(out / "tokenizer.model.tmp", existing_tok)

    jobs = [(i, u, str(out), tok.fingerprint, opts, val_threshold(opts.val_fraction)) for i, u in enumerate(units)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    log(f"data: tokenizing {len(units)} unit(s) from {len(inputs)} input(s) with {workers} process(es) into {out}")
    results: list[dict] = [{}] * len(jobs)
    bar = _bar(len(jobs), progress)
    total = 0
    if workers == 1:
        stream = ((j[0], _prepare_unit(j)) for j in jobs)
    else:
        pool = multiprocessing.get_context("fork").Pool(workers)
        stream = zip((j[0] for j in jobs), pool.imap(_prepare_unit, jobs))
    try:
        for index, result in stream:
            results[index] = result
            total += result["train"]["tokens"] + result["val"]["tokens"]
            if bar is not None:
                bar.set_postfix_str(f"{total / 1e6:.1f}M tokens")
                bar.update(1)
    finally:
        if workers > 1:
            pool.terminate()
        if bar is not None:
            bar.close()
    held_out, kept = (sum(r[s]["documents"] for r in results) for s in ("val", "train"))
    if opts.val_fraction > 0 and held_out == 0 and kept > 1:
        # no text hashed below the threshold (a small corpus): hold out the one with the smallest hash
        index = min((i for i, r in enumerate(results) if r["min_hash"] is not None), key=lambda i: results[i]["min_hash"])
        log(f"data: no document hashed into the {opts.val_fraction:g} val split; holding out the one with the"
            f" smallest hash (unit {index})")
        results[index] = _prepare_unit(jobs[index][:-1] + (results[index]["min_hash"] + 1,))

    splits = {}
    for s in SPLITS:
        shards = [{"file": f"{s}/{i:06d}.bin", "tokens": r[s]["tokens"], "documents": r[s]["documents"]}
                  for i, r in enumerate(results) if r[s]["tokens"] > 0]
        splits[s] = {"tokens": sum(x["tokens"] for x in shards), "documents": sum(x["documents"] for x in shards),
                     "shards": shards}
    if splits["train"]["documents"] == 0:
        raise DataError(f"{', '.join(inputs)}: no non-empty documents found (check --format and --text-field)")
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"file": "tokenizer.model", "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                      "eos_id": tok.eos_id},
        "dtype": dtype_for(tok.vocab_size).name,
        "source_fingerprint": source_fp,
        "inputs": [str(i) for i in inputs],
        "units": len(units),
        "text_field": opts.text_field,
        "val_fraction": opts.val_fraction,
        "val_split_rule": SPLIT_RULE,
        "splits": splits,
    }
    _write_json(meta_file, meta)
    skipped = sum(r["skipped"] for r in results)
    log(f"data: {splits['train']['tokens']:,} train tokens ({splits['train']['documents']:,} documents),"
        f" {splits['val']['tokens']:,} val tokens; {skipped} unit(s) were already done")
    return meta


def _bar(total: int, enabled: bool):
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="unit", dynamic_ncols=True)
