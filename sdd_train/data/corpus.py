"""The embedded default corpus: this Python's standard-library sources, tokenised once and cached.

Every machine with Python has this text, so ``make train`` works with no download. The cache key
covers the file list, the tokenizer settings and the split, so a different Python install or
config builds its own cache instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdd_train.config import DataConfig
from sdd_train.data.tokenizer import Tokenizer, train_tokenizer

# Sub-packages left out: tests are huge and repetitive, the rest is not ordinary library code.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def stdlib_files(max_bytes: int) -> list[Path]:
    """Sorted standard-library ``.py`` files, up to ``max_bytes`` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))
    chosen, total = [], 0
    for p in files:
        size = p.stat().st_size
        if total + size > max_bytes:
            break
        chosen.append(p)
        total += size
    if not chosen:
        raise RuntimeError(f"no standard-library sources found under {root}; set data.source to a prepared dataset")
    return chosen


@dataclass(frozen=True)
class TokenizedCorpus:
    """Token ids of the corpus (documents separated by EOS), split into train and validation."""

    directory: Path
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("SDD_TRAIN_CACHE", Path.home() / ".cache" / "sdd_train"))


def _fingerprint(files: list[Path], cfg: DataConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"vocab": cfg.tokenizer_vocab_size, "val": cfg.val_fraction, "v": 1}).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _write_atomic_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def load_stdlib_corpus(cfg: DataConfig, log=print) -> TokenizedCorpus:
    """Build (once) and load the default corpus: tokenizer + train/val token arrays."""
    files = stdlib_files(cfg.max_corpus_bytes)
    directory = cache_root(cfg) / f"stdlib-{_fingerprint(files, cfg)}"
    done = directory / "meta.json"
    if not done.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        log(f"data: building the default corpus from {len(files)} standard-library files"
            f" ({sum(map(len, docs)) / 1e6:.1f}M chars) in {directory}")
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            text_path = Path(tmp) / "corpus.txt"
            text_path.write_text("\n".join(docs), encoding="utf-8")
            train_tokenizer([text_path], directory / "tokenizer", vocab_size=cfg.tokenizer_vocab_size)
        tokenizer = Tokenizer(directory / "tokenizer.model")
        ids = tokenizer.encode_documents(docs)
        n_val = max(1, round(len(ids) * cfg.val_fraction))  # whole documents, the last ones held out
        train = np.concatenate(ids[:-n_val]).astype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)
        val = np.concatenate(ids[-n_val:]).astype(train.dtype)
        _write_atomic_npy(directory / "train.npy", train)
        _write_atomic_npy(directory / "val.npy", val)
        meta = {"files": len(files), "documents": len(ids), "train_tokens": int(train.size),
                "val_tokens": int(val.size), "vocab_size": tokenizer.vocab_size}
        tmp_meta = directory / "meta.json.tmp"
        tmp_meta.write_text(json.dumps(meta, indent=1))
        tmp_meta.replace(done)  # the cache counts as complete only once this file exists
        log(f"data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens")
    tokenizer = Tokenizer(directory / "tokenizer.model")
    return TokenizedCorpus(
        directory=directory,
        tokenizer=tokenizer,
        train=np.load(directory / "train.npy", mmap_mode="r"),
        val=np.load(directory / "val.npy", mmap_mode="r"),
    )
