"""Batches of fixed-length windows from a token array.

Training windows are drawn at random offsets from a generator seeded by (seed, step) alone, so a resumed run sees exactly the batches an uninterrupted run would have seen, with no
loader state to save. Validation windows are fixed, contiguous and non-overlapping.
"""

from __future__ import annotations

import numpy as np
import torch


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = torch.from_numpy(np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64))
    return chunk[:, :-1], chunk[:, 1:]


def train_batch(tokens: np.ndarray, seq_len: int, global_batch_size: int, seed: int, step: int,
                start: int = 0, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [size, seq_len]: sequences ``start:start+size`` of the global batch of ``step``.

    The global batch depends on (seed, step) only, so any split into micro-batches (or ranks)
    sees the same sequences.
    """
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the training data has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - seq_len, size=global_batch_size)
    return _windows(tokens, starts[start:start + (size or global_batch_size)], seq_len)


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``n_batches`` fixed batches of consecutive windows from the start of ``tokens``."""
    n_windows = min(n_batches * batch_size, (len(tokens) - 1) // seq_len)
    starts = np.arange(n_windows) * seq_len
    return [_windows(tokens, starts[i:i + batch_size], seq_len) for i in range(0, n_windows, batch_size)]
