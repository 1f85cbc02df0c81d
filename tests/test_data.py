"""Data pipeline: sources, tokenizer, resumable preparation, the rank-independent loader, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_model_cfg, small_run
from sdd_train.config import DataConfig
from sdd_train.data.__main__ import main as data_main
from sdd_train.data.corpus import load_stdlib_corpus, stdlib_files
from sdd_train.data.dataset import PreparedDataset
from sdd_train.data.loader import MixtureLoader, doc_ids_of, val_batches
from sdd_train.data.prepare import PrepareOptions, prepare, text_hash, val_threshold
from sdd_train.data.sources import DataError, Unit, iter_documents, list_units
from sdd_train.data.tokenizer import Tokenizer, train_tokenizer
from sdd_train.model import Transformer
from sdd_train import checkpoint
from sdd_train.train.__main__ import main as train_main
from sdd_train.diagnostics.summary import read_records

SAMPLES = [
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\tTabbed\r\nline\n",
    "Ünïcödé — emoji 🚀, CJK 中文字符, Arabic مرحبا, math ∑∫√ and   multiple   spaces  ",
    "    leading indentation and trailing newline\n\n\n",
    "digits 1234567890 and 3.14159e-10, hex 0xDEADBEEF",
    "",
]


def words(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "sdd", "norm", "scale", "the", "of", "model", "layer", "ünï"]
    return " ".join(rng.choice(vocab, n))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Inputs in every local format: text files, JSONL (one big enough to split), JSON, Parquet, HF."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "txt").mkdir()
    for i in range(5):
        (root / "txt" / f"doc{i}.txt").write_text(words(200 + 30 * i, i))
    (root / "txt" / "empty.txt").write_text("")
    with open(root / "big.jsonl", "w") as f:
        for i in range(400):
            f.write(json.dumps({"text": words(20 + i % 17, 100 + i), "id": i}) + "\n")
    (root / "records.json").write_text(json.dumps([{"body": words(50, 900 + i)} for i in range(10)]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": [words(40, 700 + i) for i in range(30)]})
    pq.write_table(table, root / "part.parquet", row_group_size=10)
    import datasets

    datasets.Dataset.from_dict({"text": [words(30, 500 + i) for i in range(25)]}).save_to_disk(str(root / "hf"))
    return root


@pytest.fixture(scope="module")
def tokenizer_model(corpus_dir) -> Path:
    docs = [p.read_text() for p in sorted((corpus_dir / "txt").glob("*.txt"))] + SAMPLES
    return train_tokenizer(docs, corpus_dir / "tok", vocab_size=400)


# --------------------------------------------------------------------------- sources


def test_every_input_format_yields_its_documents(corpus_dir):
    def docs(inputs, **kw):
        return [d for u in list_units(inputs, **{k: v for k, v in kw.items() if k in ("fmt", "unit_bytes")})
                for d in iter_documents(u, kw.get("field", "text"))]

    assert len(docs([str(corpus_dir / "txt")])) == 5  # a directory: one document per file (empty ones skipped)
    assert len(docs([str(corpus_dir / "txt" / "doc*.txt")])) == 5  # a glob
    assert docs([str(corpus_dir / "big.jsonl")])[3] == words(23, 103)
    assert len(docs([str(corpus_dir / "records.json")], field="body")) == 10
    assert docs([str(corpus_dir / "part.parquet")]) == [words(40, 700 + i) for i in range(30)]
    assert docs([str(corpus_dir / "hf")]) == [words(30, 500 + i) for i in range(25)]


def test_large_files_split_into_line_aligned_units(corpus_dir):
    path = str(corpus_dir / "big.jsonl")
    whole = [d for u in list_units([path]) for d in iter_documents(u)]
    units = list_units([path], unit_bytes=997)  # ranges cut mid-line
    assert len(units) > 10
    split = [d for u in units for d in iter_documents(u)]
    assert split == whole  # no line lost or read twice
    assert len(list_units([str(corpus_dir / "part.parquet")])) == 3  # one unit per row group


# --------------------------------------------------------------------------- tokenizer


def test_round_trip_is_lossless(tokenizer_model, data_cache):
    stdlib = load_stdlib_corpus(DataConfig(max_corpus_bytes=300_000, tokenizer_vocab_size=512, val_fraction=0.3,
                                           cache_dir=str(data_cache)), log=lambda *_: None).tokenizer
    rng = np.random.default_rng(0)
    varied = SAMPLES + ["".join(chr(c) for c in rng.integers(32, 0x2FFF, 300)) for _ in range(5)]
    for tok in (Tokenizer(tokenizer_model), stdlib):
        for text in varied:
            assert tok.decode(tok.encode(text)) == text


def test_tokenizer_cli_unigram_and_special_tokens(corpus_dir, tmp_path, capsys):
    out = tmp_path / "uni.model"
    assert data_main(["tokenizer", str(corpus_dir / "txt"), "--out", str(out), "--vocab-size", "280",
                      "--model-type", "unigram", "--special", "<|endoftext|>"]) == 0
    tok = Tokenizer(out)
    assert tok.vocab_size == 280 and tok.sp.piece_to_id("<|endoftext|>") > 1
    assert tok.encode("a<|endoftext|>b")[1] == tok.sp.piece_to_id("<|endoftext|>")
    assert "unigram" in capsys.readouterr().out


# --------------------------------------------------------------------------- preparation


def test_prepare_writes_shards_metadata_and_split(corpus_dir, tokenizer_model, tmp_path):
    out = tmp_path / "ds"
    assert data_main(["prepare", str(corpus_dir / "txt"), str(corpus_dir / "big.jsonl"), "--tokenizer",
                      str(tokenizer_model), "--out", str(out), "--val-fraction", "0.1", "--workers", "2"]) == 0
    ds = PreparedDataset(out)
    meta = ds.meta
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == 400
    docs = meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"]
    assert docs == 405
    assert 10 < meta["splits"]["val"]["documents"] < 80
    tokens = np.concatenate([np.fromfile(out / s["file"], dtype=np.uint16) for s in meta["splits"]["train"]["shards"]])
    assert len(tokens) == meta["splits"]["train"]["tokens"] == len(ds.train)
    assert (tokens == ds.tokenizer.eos_id).sum() == meta["splits"]["train"]["documents"]  # EOS after each doc
    expected = {words(200 + 30 * i, i) for i in range(5)} | {words(20 + i % 17, 100 + i) for i in range(400)}
    decoded = set(_split_documents(out)["train"])
    assert decoded <= expected and len(decoded) > 300


def _split_documents(root: Path) -> dict[str, list[str]]:
    """Each split's documents, decoded from its shards (EOS after each)."""
    ds = PreparedDataset(root)
    out = {}
    for split in ("train", "val"):
        tokens = np.concatenate([np.fromfile(root / s["file"], dtype=np.uint16) for s in ds.meta["splits"][split]["shards"]])
        bounds = np.flatnonzero(tokens == ds.tokenizer.eos_id)
        out[split] = sorted(ds.tokenizer.decode(d[:-1]) for d in np.split(tokens, bounds + 1)[:-1])
    return out


def test_val_split_depends_on_the_text_not_where_it_lives(corpus_dir, tokenizer_model, tmp_path):
    # the same documents, once as given and once moved, reordered, with a duplicate, and cut into other units
    lines = (corpus_dir / "big.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "renamed.jsonl"
    moved.write_text("".join(lines[::-1] + lines[:40]))
    quiet = {"opts": PrepareOptions(val_fraction=0.2), "progress": False, "log": lambda *_: None}
    prepare([str(corpus_dir / "big.jsonl")], tokenizer_model, tmp_path / "a", **quiet)
    prepare([str(moved)], tokenizer_model, tmp_path / "b", unit_bytes=997, **quiet)
    a, b = _split_documents(tmp_path / "a"), _split_documents(tmp_path / "b")
    assert 40 < len(a["val"]) < 120
    assert set(a["val"]) == set(b["val"]) and set(a["train"]) == set(b["train"])
    assert len(b["val"]) + len(b["train"]) == 440 and not set(b["val"]) & set(b["train"])  # duplicates side by side


def test_a_small_corpus_still_gets_a_val_document(corpus_dir, tokenizer_model, tmp_path):
    texts = [p.read_text() for p in sorted((corpus_dir / "txt").glob("doc*.txt"))]
    fraction = 1e-6
    assert min(map(text_hash, texts)) >= val_threshold(fraction)  # none would be held out by the hash alone
    out, quiet = tmp_path / "ds", {"progress": False, "log": lambda *_: None}
    prepare([str(corpus_dir / "txt")], tokenizer_model, out, opts=PrepareOptions(val_fraction=fraction), **quiet)
    docs = _split_documents(out)
    assert docs["val"] == [min(texts, key=text_hash)] and sorted(docs["train"] + docs["val"]) == sorted(texts)
    before = _dataset_bytes(out)
    (out / "metadata.json").unlink()  # killed before the end: the re-run redoes the held-out unit the same way
    prepare([str(corpus_dir / "txt")], tokenizer_model, out, opts=PrepareOptions(val_fraction=fraction), **quiet)
    assert _dataset_bytes(out) == before
    (out / "metadata.json").unlink()  # a partial preparation with another fraction: its units are redone
    prepare([str(corpus_dir / "txt")], tokenizer_model, out, opts=PrepareOptions(val_fraction=0.45), **quiet)
    assert sorted(_split_documents(out)["val"]) == sorted(t for t in texts if text_hash(t) < val_threshold(0.45))
    prepare([str(corpus_dir / "txt")], tokenizer_model, tmp_path / "none", opts=PrepareOptions(val_fraction=0), **quiet)
    assert PreparedDataset(tmp_path / "none").meta["splits"]["val"]["documents"] == 0  # 0 asks for no val split


def _dataset_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_killed_preparation_reruns_to_the_same_result(corpus_dir, tokenizer_model, tmp_path):
    inputs, opts, unit = [str(corpus_dir / "big.jsonl")], PrepareOptions(val_fraction=0.05), 997  # ~30 units
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    prepare(inputs, tokenizer_model, reference, opts=opts, workers=1, progress=False, log=lambda *_: None,
            unit_bytes=unit)
    code = (  # the same preparation, slowed down per unit so the kill lands mid-run
        "import time; from pathlib import Path; import sdd_train.data.prepare as p\n"
        "real = p._prepare_unit\n"
        "p._prepare_unit = lambda job: (time.sleep(0.05), real(job))[1]\n"
        f"p.prepare({inputs!r}, Path({str(tokenizer_model)!r}), Path({str(killed)!r}),"
        f" opts=p.PrepareOptions(val_fraction=0.05), workers=1, progress=False, unit_bytes={unit})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((killed / "units").glob("*.json"))) < 5:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "metadata.json").exists(), "finished before the kill"
    with pytest.raises(DataError, match="not a prepared dataset"):
        PreparedDataset(killed)  # an interrupted dataset cannot be mistaken for a complete one
    messages: list[str] = []
    prepare(inputs, tokenizer_model, killed, opts=opts, workers=2, progress=False, log=messages.append,
            unit_bytes=unit)
    assert "0 unit(s) were already done" not in messages[-1]
    assert not list(killed.rglob("*.tmp"))
    assert _dataset_bytes(killed) == _dataset_bytes(reference)


def test_prepare_is_idempotent_and_refuses_other_inputs(corpus_dir, tokenizer_model, tmp_path):
    out = tmp_path / "ds"
    args = ["prepare", str(corpus_dir / "txt"), "--tokenizer", str(tokenizer_model), "--out", str(out)]
    assert data_main(args) == 0
    before = _dataset_bytes(out)
    assert data_main(args) == 0
    assert _dataset_bytes(out) == before
    other = ["prepare", str(corpus_dir / "big.jsonl"), "--tokenizer", str(tokenizer_model), "--out", str(out)]
    assert data_main(other) == 2
    assert data_main(other + ["--overwrite"]) == 0


def test_inspect_prints_counts_and_sample(corpus_dir, tokenizer_model, tmp_path, capsys):
    out = tmp_path / "ds"
    prepare([str(corpus_dir / "hf")], tokenizer_model, out, progress=False, log=lambda *_: None)
    assert data_main(["inspect", str(out), "--sample", "30"]) == 0
    text = capsys.readouterr().out
    assert "train:" in text and "documents" in text and "sample" in text


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case,message", [
    ("empty", "the file is empty"),
    ("utf8", "invalid UTF-8 at byte 5"),
    ("field", "no 'text' field (fields: body); pass --text-field NAME"),
    ("json", "not valid JSON"),
    ("missing", "no such file or directory"),
    ("glob", "the glob matches no files"),
])
def test_bad_inputs_name_the_file_and_the_fix(case, message, tokenizer_model, tmp_path, capsys):
    f = tmp_path / {"empty": "e.txt", "utf8": "u.txt", "field": "f.jsonl", "json": "j.jsonl",
                    "missing": "nope.txt", "glob": "*.none"}[case]
    if case == "empty":
        f.write_text("")
    elif case == "utf8":
        f.write_bytes(b"hello\xff\xfeworld")
    elif case == "field":
        f.write_text(json.dumps({"body": "x"}) + "\n")
    elif case == "json":
        f.write_text("{not json}\n")
    out = tmp_path / "out"
    assert data_main(["prepare", str(f), "--tokenizer", str(tokenizer_model), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err
    if case != "glob":
        assert str(f.name) in err
    assert not (out / "metadata.json").exists()  # nothing that looks complete


def test_invalid_utf8_can_be_replaced(tokenizer_model, tmp_path):
    f = tmp_path / "u.txt"
    f.write_bytes(b"hello\xffworld")
    docs = list(iter_documents(Unit(str(f), "text"), utf8_errors="replace"))
    assert docs == ["hello\ufffdworld"]


def test_corrupt_or_mismatched_datasets_are_refused(corpus_dir, tokenizer_model, tmp_path, data_cache, capsys):
    out = tmp_path / "ds"
    prepare([str(corpus_dir / "txt")], tokenizer_model, out, progress=False, log=lambda *_: None)
    shard = out / PreparedDataset(out).meta["splits"]["train"]["shards"][0]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-6])
    with pytest.raises(DataError, match="corrupt or truncated shard"):
        PreparedDataset(out)
    shard.write_bytes(data)
    # the tokenizer next to the shards replaced by another one
    other = train_tokenizer([words(3000, 1)], tmp_path / "other", vocab_size=350)
    (out / "tokenizer.model").write_bytes(other.read_bytes())
    with pytest.raises(DataError, match="does not match the tokenizer the shards were made with"):
        PreparedDataset(out)
    (out / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    # a model whose embedding is smaller than the dataset's vocabulary: exit 2 before training
    args = small_run(tmp_path / "run", data_cache, "data.source=prepared", f"data.datasets=[{{path: {out}}}]",
                     "model.vocab_size=300")
    assert train_main(args) == 2
    assert "model.vocab_size: 300 is smaller than the tokenizer's 400 pieces" in capsys.readouterr().err


# --------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def two_datasets(corpus_dir, tokenizer_model, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prepared")
    a, b = root / "a", root / "b"
    prepare([str(corpus_dir / "big.jsonl")], tokenizer_model, a, progress=False, log=lambda *_: None)
    prepare([str(corpus_dir / "txt")], tokenizer_model, b, progress=False, log=lambda *_: None)
    return a, b


def loader_for(paths, weights, seq_len=16, seed=3, doc_mask=False) -> MixtureLoader:
    ds = [PreparedDataset(p) for p in paths]
    return MixtureLoader([d.train for d in ds], weights, seq_len, seed, ds[0].tokenizer.eos_id, doc_mask=doc_mask)


def rank_batches(loader: MixtureLoader, consumed: int, global_batch: int, ranks: int) -> torch.Tensor:
    per = global_batch // ranks
    return torch.cat([loader.batch(consumed, r * per, per)["inputs"] for r in range(ranks)])


def test_global_order_is_independent_of_the_number_of_ranks(two_datasets):
    loader = loader_for(two_datasets, [1.0, 1.0])
    for step in range(5):
        single = loader.batch(step * 12, 0, 12)["inputs"]
        for ranks in (2, 3):
            assert torch.equal(rank_batches(loader, step * 12, 12, ranks), single)
    # a fresh loader with the same seed gives the same order; another seed does not
    assert torch.equal(loader_for(two_datasets, [1.0, 1.0]).batch(24, 0, 12)["inputs"], loader.batch(24, 0, 12)["inputs"])
    assert not torch.equal(loader_for(two_datasets, [1.0, 1.0], seed=4).batch(24, 0, 12)["inputs"],
                           loader.batch(24, 0, 12)["inputs"])


def test_resume_mid_epoch_with_other_rank_counts(two_datasets):
    loader = loader_for(two_datasets, [1.0, 1.0])
    b = 12
    steps = loader.epoch_size // b + 3  # cross an epoch boundary
    uninterrupted = [rank_batches(loader, s * b, b, 2) for s in range(steps)]
    resumed_at = 4  # the checkpoint holds consumed = 4 * b; resume on 3 ranks in a fresh process
    fresh = loader_for(two_datasets, [1.0, 1.0])
    resumed = [rank_batches(fresh, s * b, b, 3) for s in range(resumed_at, steps)]
    assert all(torch.equal(x, y) for x, y in zip(uninterrupted[resumed_at:], resumed))
    assert fresh.epoch_of((steps - 1) * b) == 1


def test_epochs_cover_every_instance_once_and_mixing_weights_hold(two_datasets):
    counts = loader_for(two_datasets, [1.0, 1.0]).counts
    natural = loader_for(two_datasets, [float(c) for c in counts])  # weights proportional to size
    src, ind = natural.epoch_order(0)
    for j, count in enumerate(counts):
        assert sorted(ind[src == j].tolist()) == list(range(count))  # every instance exactly once
    src1, _ = natural.epoch_order(1)
    assert not np.array_equal(src, src1)  # a new shuffle per epoch
    for weights, share in (([1.0, 1.0], 0.5), ([3.0, 1.0], 0.75)):
        src, ind = loader_for(two_datasets, weights).epoch_order(0)
        assert (src == 0).mean() == pytest.approx(share, abs=0.01)
        small = int(np.argmin(counts))  # the smaller dataset is up-sampled: all of it, then repeats
        assert set(ind[src == small].tolist()) == set(range(counts[small])) or (src == small).sum() < counts[small]


def test_doc_ids_and_document_masked_attention(two_datasets):
    eos = 1
    inputs = np.array([[5, 6, eos, 7, 8, eos, 9]])
    assert doc_ids_of(inputs, eos).tolist() == [[0, 0, 0, 1, 1, 1, 2]]
    # with the mask a document's logits do not depend on what precedes it (RoPE is relative)
    torch.manual_seed(0)
    model = Transformer(small_model_cfg("sdd")).eval()
    doc1, doc2 = torch.tensor([[5, 6, 7, eos]]), torch.tensor([[8, 9, 10, 11, 12]])
    both = torch.cat([doc1, doc2], dim=1)
    masked = model(both, torch.from_numpy(doc_ids_of(both.numpy(), eos)))
    torch.testing.assert_close(masked[:, 4:], model(doc2), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(model(both)[:, 4:], model(doc2), atol=1e-3)  # without it, they do
    batch = loader_for(two_datasets, [1.0, 1.0], doc_mask=True).batch(0, 0, 4)
    assert batch["doc_ids"].shape == batch["inputs"].shape


def test_val_batches_are_fixed_windows_spread_over_the_split(corpus_dir, tokenizer_model, tmp_path):
    # a quarter held out, so that the val split holds several windows
    prepare([str(corpus_dir / "big.jsonl")], tokenizer_model, tmp_path / "ds", opts=PrepareOptions(val_fraction=0.25),
            progress=False, log=lambda *_: None)
    ds = PreparedDataset(tmp_path / "ds")
    total = ds.val.n_instances(8)
    assert total > 12
    batches = val_batches(ds.val, 8, 2, 3, ds.tokenizer.eos_id, doc_mask=False)
    assert len(batches) == 3
    windows = [i * total // 6 for i in range(6)]  # evenly over the split, not its first 6 windows
    rows = [row for b in batches for row in b["inputs"]]
    for row, window in zip(rows, windows):
        assert torch.equal(row, torch.from_numpy(ds.val.instance(window, 8)[:-1]))
    assert windows[-1] >= total * 5 // 6 - 1
    assert torch.equal(batches[0]["targets"][:, :-1], batches[0]["inputs"][:, 1:])
    every = val_batches(ds.val, 8, 2, total, ds.tokenizer.eos_id, doc_mask=False)  # asked for more: all of them
    assert sum(len(b["inputs"]) for b in every) == total


def test_training_on_a_mixture_of_prepared_datasets(two_datasets, tmp_path, data_cache):
    a, b = two_datasets
    datasets = f"data.datasets=[{{path: {a}, weight: 2.0}}, {{path: {b}, weight: 1.0, name: txt}}]"
    args = small_run(tmp_path, data_cache, "data.source=prepared", datasets, "model.vocab_size=512",
                     "model.max_seq_len=32", "train.seq_len=32", "train.max_steps=25", "train.eval_interval=25",
                     "data.doc_mask=true", "train.checkpoint_interval=10")
    assert train_main(args) == 0
    records = [r for r in read_records(tmp_path / "metrics.jsonl") if "loss" in r]
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    meta = checkpoint.read_meta(checkpoint.latest(tmp_path))
    assert meta["data"]["instances_consumed"] == 25 * 8


def test_stdlib_corpus_is_cached_and_files_capped(data_cache):
    messages: list[str] = []
    cfg = DataConfig(max_corpus_bytes=300_000, tokenizer_vocab_size=512, val_fraction=0.3, cache_dir=str(data_cache))
    first = load_stdlib_corpus(cfg, log=messages.append)
    again = load_stdlib_corpus(cfg, log=messages.append)
    assert first.root == again.root and not any("building" in m for m in messages[1:])
    assert first.train.documents > 0 and first.val.documents > 0
    files = stdlib_files(200_000)
    assert files == sorted(files) and sum(p.stat().st_size for p in files) <= 200_000
    assert all(p.stat().st_size > 0 for p in stdlib_files(DataConfig().max_corpus_bytes))  # empty __init__.py out


BUILD_CORPUS = """
import sys
from sdd_train.config import DataConfig
from sdd_train.data.corpus import load_stdlib_corpus
cfg = DataConfig(max_corpus_bytes=400_000, tokenizer_vocab_size=512, val_fraction=0.3, cache_dir=sys.argv[1])
data = load_stdlib_corpus(cfg, log=lambda m: None)
print(data.train.documents, data.val.documents, sum(a.size for a in data.train.arrays))
"""


def test_processes_that_build_one_corpus_at_once_agree(tmp_path):
    """Two runs sharing a data cache (two sweeps, the matrix's shards, a job array) start together: each
    gets the whole corpus, built once, and neither trips over the other's partial files."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_CORPUS, str(tmp_path)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    assert len({out for out, _ in outputs}) == 1
    (dataset,) = tmp_path.glob("stdlib-*/dataset")
    assert not [p for p in dataset.parent.rglob("*") if ".tmp" in p.name or ".partial" in p.name]
