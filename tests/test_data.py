"""The embedded corpus, the tokenizer's lossless round trip, and the batch sampler."""

import numpy as np
import torch

from sdd_train.config import DataConfig
from sdd_train.data.corpus import load_stdlib_corpus, stdlib_files
from sdd_train.data.sampler import train_batch, val_batches

SAMPLES = [
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\tTabbed\r\nline\n",
    "Ünïcödé — emoji 🚀, CJK 中文字符, Arabic مرحبا, math ∑∫√ and   multiple   spaces  ",
    "    leading indentation and trailing newline\n\n\n",
    "digits 1234567890 and 3.14159e-10, hex 0xDEADBEEF",
    "",
]


def small_corpus(cache) -> DataConfig:
    return DataConfig(max_corpus_bytes=300_000, tokenizer_vocab_size=512, cache_dir=str(cache))


def test_round_trip_is_lossless(data_cache):
    tok = load_stdlib_corpus(small_corpus(data_cache), log=lambda *_: None).tokenizer
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text


def test_corpus_is_cached_and_split(data_cache):
    messages = []
    cfg = small_corpus(data_cache)
    first = load_stdlib_corpus(cfg, log=messages.append)
    again = load_stdlib_corpus(cfg, log=messages.append)
    assert first.directory == again.directory
    assert not any("building" in m for m in messages[1:])  # second load reads the cache
    assert first.train.dtype == np.uint16 and first.train.size > 10 * first.val.size > 0
    assert int(first.train.max()) < first.tokenizer.vocab_size == 512
    eos = first.tokenizer.eos_id
    assert (first.train == eos).sum() > 1  # documents separated by EOS


def test_interrupted_build_is_redone(tmp_path):
    cfg = small_corpus(tmp_path)
    corpus = load_stdlib_corpus(cfg, log=lambda *_: None)
    directory, expected = corpus.directory, np.array(corpus.train)
    del corpus  # release the memory map before corrupting the file under it
    (directory / "meta.json").unlink()  # as if killed before the completion marker was written
    (directory / "train.npy").write_bytes(b"garbage")
    rebuilt = load_stdlib_corpus(cfg, log=lambda *_: None)
    assert np.array_equal(np.asarray(rebuilt.train), expected)


def test_stdlib_files_are_sorted_and_capped():
    files = stdlib_files(200_000)
    assert files == sorted(files)
    assert sum(p.stat().st_size for p in files) <= 200_000


def test_sampler_is_a_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    x1, y1 = train_batch(tokens, 16, 8, seed=1, step=5)
    x2, _ = train_batch(tokens, 16, 8, seed=1, step=5)
    assert torch.equal(x1, x2)
    assert torch.equal(y1[:, :-1], x1[:, 1:])  # targets are inputs shifted by one
    assert not torch.equal(x1, train_batch(tokens, 16, 8, seed=1, step=6)[0])
    assert not torch.equal(x1, train_batch(tokens, 16, 8, seed=2, step=5)[0])
    halves = [train_batch(tokens, 16, 8, seed=1, step=5, start=s, size=4)[0] for s in (0, 4)]
    assert torch.equal(torch.cat(halves), x1)  # micro-batches are slices of one global batch


def test_val_batches_are_fixed_contiguous_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = val_batches(tokens, 10, 4, 3)
    assert len(batches) == 3
    x, y = batches[1]
    assert x[0, 0].item() == 40 and torch.equal(y, x + 1)
