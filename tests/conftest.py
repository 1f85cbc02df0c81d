from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py

from sdd_train.config import InitConfig, ModelConfig  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = str(CONFIGS / "tiny.yaml")
DENSE_1B = str(CONFIGS / "dense_1b.yaml")
ALL_BLOCKS = ["pre", "post", "deepnorm", "reordered", "sdd", "sdd_pre", "spannorm", "peri", "lns", "mixln", "rezero",
              "hybridnorm", "ngpt"]
# nGPT is defined for a dense FFN and an untied head (it refuses the MoE and a tied table at start-up)
BLOCK_FFNS = [(block, ffn) for block in ALL_BLOCKS for ffn in ("dense", "moe") if (block, ffn) != ("ngpt", "moe")]


def block_overrides(block: str) -> list[str]:
    """The overrides that switch a run to ``block`` (nGPT's untied head with it)."""
    return [f"model.block={block}", *(["model.tie_embeddings=false"] if block == "ngpt" else [])]

# A training run small enough for a test: 2 layers of width 64 on a 300 kB slice of the corpus.
SMALL_RUN = [
    "data.max_corpus_bytes=300000", "data.tokenizer_vocab_size=512", "data.val_fraction=0.3", "model.vocab_size=512",
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
    "model.max_seq_len=64", "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=4",
    "train.compile=false", "train.log_interval=1", "optim.lr=3e-3", "optim.warmup_steps=5",
]


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", CONFIGS.parent / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_run(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    """sdd-train arguments for a small run (later overrides win)."""
    return [TINY, *SMALL_RUN, f"data.cache_dir={cache}", f"run_dir={run_dir}", *extra]


def small_model_cfg(block: str = "pre", **kw) -> ModelConfig:
    base = dict(block=block, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=48, vocab_size=97,
                max_seq_len=32, tie_embeddings=block != "ngpt")
    base.update(kw)
    if isinstance(base.get("init"), dict):
        base["init"] = InitConfig(**base["init"])
    return ModelConfig(**base)


# Tiers, decided here only: a test is `slow` when it trains (every training run shares the `data_cache`
# corpus), starts processes, or compiles; `make test-fast` runs the others, `make test` (CI) all.
SLOW_FIXTURES = {"data_cache"}
SLOW_MODULES = {"test_distributed", "test_faults", "test_hf_modeling_file", "test_gpu_suite",
                "test_host_memory", "test_kernels"}


def _compiles(item) -> bool:
    """A test of torch.compile: by its name, or a ``compile`` parameter set to true."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "compile" in item.originalname or params.get("compile") is True


@contextlib.contextmanager
def threads(n: int):
    """Run with ``n`` intra-op threads, whatever the process had (a pytest-xdist worker has its share of
    the cores, one on 2 cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pytest_configure(config) -> None:
    """Under pytest-xdist (``make test`` runs two workers) each worker takes its share of the cores, for
    its own ops and, through OMP_NUM_THREADS, for the processes it starts: two workers of two threads
    on 2 cores would oversubscribe them, and OpenMP threads that wait for a descheduled peer spin."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        module = item.module.__name__ if item.module else ""
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or module in SLOW_MODULES or _compiles(item):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from a clean dynamo cache. The blocks' forward code is shared by every model in a
    process, and the graphs that earlier tests in this worker compiled for it would count towards dynamo's
    recompile limit (8 per code object; past it a fullgraph compile fails): which tests share a worker
    changes from run to run."""
    yield
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One small default-corpus cache (tokenizer + tokens) shared by the training tests."""
    return tmp_path_factory.mktemp("corpus_cache")
