"""A run's training datasets, as its config names them: the embedded corpus or prepared datasets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdd_train.config import RunConfig
from sdd_train.data.corpus import load_stdlib_corpus
from sdd_train.data.dataset import PreparedDataset
from sdd_train.data.loader import open_datasets


def open_run_data(cfg: RunConfig, log: Callable[..., None] = print, is_main: bool = True,
                  barrier: Callable[[], None] = lambda: None) -> tuple[list[PreparedDataset], list[str]]:
    """The training datasets and their names. For the embedded corpus the main process builds the
    cache first (``barrier`` holds the others until it has), so concurrent ranks only read it."""
    if cfg.data.source == "stdlib":
        corpus = load_stdlib_corpus(cfg.data, log=log) if is_main else None
        barrier()
        corpus = corpus or load_stdlib_corpus(cfg.data, log=lambda *a: None)
        return [corpus], ["stdlib"]
    datasets = open_datasets([d.path for d in cfg.data.datasets])
    names = [d.name or Path(d.path).name for d in cfg.data.datasets]
    for name, ds in zip(names, datasets):
        log(f"data: {name}: {len(ds.train):,} train / {len(ds.val):,} val tokens ({ds.root})")
    return datasets, names
