"""Deterministic, rank-independent batches over one or several prepared datasets.

The run consumes one infinite stream of training instances: epoch after epoch, each epoch a
mixture of the datasets' instances (their share set by the mixing weights) in an order fixed by
(seed, epoch) alone. Global batch ``k`` is the next ``global_batch_size`` instances of that
stream; rank ``r`` reads its slice of it. The loader state is therefore one number, the count of
instances consumed, which goes into the checkpoint: a resumed run continues the stream exactly,
with any number of ranks (and even after changing the batch size).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sdd_train.config import InstanceFilterConfig
from sdd_train.data.dataset import PreparedDataset, TokenSplit
from sdd_train.data.instance_filter import mask_repetitive
from sdd_train.data.sources import DataError


def doc_ids_of(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """[B, S] inputs -> [B, S] document index per position; a document ends with (and includes) EOS."""
    ends = (inputs == eos_id).astype(np.int64)
    return np.concatenate([np.zeros_like(ends[:, :1]), np.cumsum(ends, axis=1)[:, :-1]], axis=1)


class MixtureLoader:
    def __init__(self, splits: list[TokenSplit], weights: list[float], seq_len: int, seed: int, eos_id: int,
                 names: list[str] | None = None, doc_mask: bool = False,
                 instance_filter: InstanceFilterConfig | None = None):
        self.splits, self.seq_len, self.seed, self.eos_id, self.doc_mask = splits, seq_len, seed, eos_id, doc_mask
        self.instance_filter = instance_filter if instance_filter is not None and instance_filter.enabled else None
        names = names or [f"dataset {i}" for i in range(len(splits))]
        self.counts = [s.n_instances(seq_len) for s in splits]
        for name, count in zip(names, self.counts):
            if count == 0:
                raise DataError(f"{name}: fewer than seq_len + 1 = {seq_len + 1} tokens; add data or lower train.seq_len")
        if len(weights) != len(splits) or any(w <= 0 for w in weights):
            raise DataError("data.datasets: every dataset needs a weight > 0")
        total = sum(self.counts)
        shares = np.asarray(weights, dtype=np.float64) / sum(weights)
        take = np.floor(shares * total).astype(np.int64)
        take[np.argmax(shares)] += total - take.sum()  # epochs keep the natural size of the mixture
        self.take = take.tolist()
        self.epoch_size = int(total)
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, instance) of every position of ``epoch``; a function of (seed, epoch) only."""
        with self._lock:
            if self._cache is not None and self._cache[0] == epoch:
                return self._cache[1], self._cache[2]
            rng = np.random.default_rng([self.seed, epoch])
            sources, indices = [], []
            for j, (count, take) in enumerate(zip(self.counts, self.take)):
                repeats, rest = divmod(take, count)  # up-sampled datasets repeat whole, then a random subset
                idx = [rng.permutation(count) for _ in range(repeats)] + [rng.choice(count, rest, replace=False)]
                indices.append(np.concatenate(idx))
                sources.append(np.full(take, j, dtype=np.int64))
            perm = rng.permutation(self.epoch_size)
            src, ind = np.concatenate(sources)[perm], np.concatenate(indices)[perm]
            self._cache = (epoch, src, ind)
            return src, ind

    def instances(self, first: int, n: int) -> np.ndarray:
        """Instances ``[first, first + n)`` of the stream as an [n, seq_len + 1] int64 array."""
        out = np.empty((n, self.seq_len + 1), dtype=np.int64)
        for row, g in enumerate(range(first, first + n)):
            epoch, pos = divmod(g, self.epoch_size)
            src, ind = self.epoch_order(epoch)
            out[row] = self.splits[int(src[pos])].instance(int(ind[pos]), self.seq_len)
        return out

    def batch(self, consumed: int, start: int, size: int) -> dict[str, torch.Tensor]:
        """Sequences ``start:start+size`` of the global batch that begins at stream position ``consumed``."""
        chunk = self.instances(consumed + start, size)
        targets = chunk[:, 1:]
        if self.instance_filter is not None:
            targets = targets.copy()
            mask_repetitive(chunk, targets, self.instance_filter)
        batch = {"inputs": torch.from_numpy(chunk[:, :-1]), "targets": torch.from_numpy(targets)}
        if self.doc_mask:
            batch["doc_ids"] = torch.from_numpy(doc_ids_of(chunk[:, :-1], self.eos_id))
        return batch

    def epoch_of(self, consumed: int) -> int:
        return consumed // self.epoch_size


def val_batches(split: TokenSplit, seq_len: int, batch_size: int, n_batches: int, eos_id: int, doc_mask: bool
                ) -> list[dict[str, torch.Tensor]]:
    """Up to ``n_batches`` fixed batches of windows spread evenly over a validation split (all of them
    when it holds no more): the estimate covers the whole split, not its first documents, whose
    losses can be far from the rest (they differ by a nat from document to document in code)."""
    total = split.n_instances(seq_len)
    n = min(n_batches * batch_size, total)
    windows = [i * total // n for i in range(n)]
    out = []
    for first in range(0, n, batch_size):
        chunk = np.stack([split.instance(i, seq_len) for i in windows[first:first + batch_size]])
        batch = {"inputs": torch.from_numpy(chunk[:, :-1]), "targets": torch.from_numpy(chunk[:, 1:])}
        if doc_mask:
            batch["doc_ids"] = torch.from_numpy(doc_ids_of(chunk[:, :-1], eos_id))
        out.append(batch)
    return out


class Prefetcher:
    """Computes batches in a background thread ahead of use (numpy releases the GIL while copying)."""

    def __init__(self, fn: Callable[..., dict[str, torch.Tensor]], pin_memory: bool = False):
        self.fn, self.pin = fn, pin_memory
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdd-prefetch")
        self.pending: dict[Hashable, Future] = {}

    def _load(self, *key) -> dict[str, torch.Tensor]:
        batch = self.fn(*key)
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin else batch

    def schedule(self, *key) -> None:
        if key not in self.pending:
            self.pending[key] = self.pool.submit(self._load, *key)

    def get(self, *key) -> dict[str, torch.Tensor]:
        self.schedule(*key)
        return self.pending.pop(key).result()

    def clear(self) -> None:
        """Forget scheduled batches: after a rollback or a resume the loop asks for other positions,
        so what was read ahead would only hold memory (a position always reads the same batch)."""
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


def open_datasets(paths: list[str]) -> list[PreparedDataset]:
    datasets = [PreparedDataset(Path(p)) for p in paths]
    first = datasets[0]
    for ds in datasets[1:]:
        if ds.meta["tokenizer"]["fingerprint"] != first.meta["tokenizer"]["fingerprint"]:
            raise DataError(f"{ds.root}: prepared with a different tokenizer than {first.root};"
                            " every dataset of a mixture must share one tokenizer")
    return datasets
