"""OLMo's repetition instance filter (``data.instance_filter``): a training instance in which some
n-gram of period ``repetition_min_period``..``repetition_max_period`` tokens repeats
``repetition_max_count`` or more times in a row has all its targets ignored (the loss of its tokens
is zero and they add nothing to the gradient; the loss is still divided by every token of the
batch, as OLMo's is). Degenerate text (a token or a phrase repeated hundreds of times) is a known
cause of loss spikes. Validation batches are not filtered, as in OLMo.

A run of period ``p`` repeated ``k`` times is ``k * p`` tokens where each token equals the one
``p`` before it for ``(k - 1) * p`` positions in a row; that is what is searched for, per period.
Like OLMo's, the search looks at periods up to a third of the instance.
"""

from __future__ import annotations

import numpy as np

from sdd_train.config import InstanceFilterConfig
from sdd_train.kernels.cross_entropy import IGNORE


def _longest_true_run(flags: np.ndarray) -> int:
    if not flags.any():
        return 0
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flags.view(np.int8), [0]))))
    return int((edges[1::2] - edges[::2]).max())


def longest_repetition(tokens: np.ndarray, period: int) -> int:
    """How many times in a row the most repeated ``period``-token n-gram of ``tokens`` occurs."""
    if len(tokens) <= period:
        return 1
    return (_longest_true_run(tokens[period:] == tokens[:-period]) + period) // period


def is_repetitive(tokens: np.ndarray, cfg: InstanceFilterConfig) -> bool:
    """Whether the filter drops the instance ``tokens`` (1-D)."""
    top = min(cfg.repetition_max_period, len(tokens) // 3)
    return any(longest_repetition(tokens, p) >= cfg.repetition_max_count
               for p in range(cfg.repetition_min_period, top + 1))


def mask_repetitive(instances: np.ndarray, targets: np.ndarray, cfg: InstanceFilterConfig) -> None:
    """Set the targets of every repetitive row of ``instances`` [B, L] to IGNORE (``targets`` [B, L - 1],
    in place)."""
    targets[np.array([is_repetitive(row, cfg) for row in instances], dtype=bool)] = IGNORE
