"""The embedded default corpus: this Python's standard-library sources, tokenised once and cached.

Every machine with Python has this text, so ``make train`` works with no download. The cache key
covers the file list, the tokenizer settings and the split, so a different Python install or
config builds its own cache instead of reusing a stale one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import sysconfig
from pathlib import Path

from sdd_train.config import DataConfig
from sdd_train.data.dataset import PreparedDataset
from sdd_train.data.prepare import PrepareOptions, prepare, text_hash, val_threshold
from sdd_train.data.tokenizer import train_tokenizer

# The default corpus's validation split holds at least this many documents (and val_fraction of its text):
# the loss of one standard-library file differs from another's by about a nat (std), so a split of a
# few files can sit half a nat away from the training loss for no fault of the model.
MIN_VAL_DOCUMENTS = 64

# Sub-packages left out: tests are huge and repetitive, the rest is not ordinary library code.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def stdlib_files(max_bytes: int) -> list[Path]:
    """Sorted standard-library ``.py`` files, up to ``max_bytes`` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
                   and p.stat().st_size > 0)
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


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("SDD_TRAIN_CACHE", Path.home() / ".cache" / "sdd_train"))


def _fingerprint(files: list[Path], cfg: DataConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"vocab": cfg.tokenizer_vocab_size, "val": cfg.val_fraction, "min_val": MIN_VAL_DOCUMENTS,
                         "v": 4}).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def fair_val_fraction(texts: list[str], fraction: float, min_documents: int = MIN_VAL_DOCUMENTS) -> float:
    """The val fraction to prepare ``texts`` with so that the held-out documents are a fair sample:
    at least ``fraction`` of the text (in bytes) and ``min_documents`` documents (a tenth of them
    for fewer than 10 x ``min_documents``), taken as every prepared dataset takes them, in the
    order of their text hashes (``fraction`` itself where its hash threshold already holds that
    much; never every document)."""
    ranked = sorted((text_hash(t), len(t.encode("utf-8", errors="surrogatepass"))) for t in texts)
    total = sum(size for _, size in ranked)
    threshold = val_threshold(fraction)
    min_documents = min(min_documents, max(1, len(ranked) // 10))
    held = held_bytes = 0
    for h, size in ranked[:-1]:  # at least one document stays in train
        if h >= threshold and held >= min_documents and held_bytes >= fraction * total:
            break
        held, held_bytes, last = held + 1, held_bytes + size, h
    if held == 0 or last < threshold:
        return fraction
    chosen = (last + 1) / 2**64
    while val_threshold(chosen) <= last:  # a float just above the last held-out hash
        chosen = math.nextafter(chosen, 1.0)
    return chosen


def load_stdlib_corpus(cfg: DataConfig, log=print) -> PreparedDataset:
    """Build (once) and open the default corpus: a tokenizer trained on it, then ``sdd-data prepare``.

    One document per file; validation documents are chosen as in any prepared dataset, by their
    text hashes, with a fraction raised where needed to hold out a fair sample
    (:func:`fair_val_fraction`): the standard library has a few very large files, and a 1%
    threshold alone can hold out a single small one.
    """
    files = stdlib_files(cfg.max_corpus_bytes)
    directory = cache_root(cfg) / f"stdlib-{_fingerprint(files, cfg)}"
    dataset = directory / "dataset"
    if not (dataset / "metadata.json").is_file():
        with _building(directory):  # runs that share the cache and start together build it once
            if not (dataset / "metadata.json").is_file():
                _build(files, directory, dataset, cfg, log)
    return PreparedDataset(dataset)


@contextlib.contextmanager
def _building(directory: Path):
    """Hold an exclusive lock on ``directory`` (an flock on a file in it; the kernel drops it when the
    holder dies, so a killed builder never leaves the cache locked)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(files: list[Path], directory: Path, dataset: Path, cfg: DataConfig, log) -> None:
    log(f"data: building the default corpus from {len(files)} standard-library files"
        f" ({sum(p.stat().st_size for p in files) / 1e6:.1f} MB) in {directory}")
    # the documents as sdd-data prepare decodes them (bytes, not text mode: no newline translation)
    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in files]
    tokenizer = directory / "tokenizer.model"
    if not tokenizer.is_file():
        train_tokenizer(texts, directory / "tokenizer", vocab_size=cfg.tokenizer_vocab_size)
    fraction = fair_val_fraction(texts, cfg.val_fraction)
    # one process: the trainer has already started torch's threads, which fork would not survive
    prepare([str(p) for p in files], tokenizer, dataset, fmt="text",
            opts=PrepareOptions(utf8_errors="replace", val_fraction=fraction), workers=1,
            progress=False, log=log)
