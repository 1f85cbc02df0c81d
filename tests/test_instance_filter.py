"""OLMo's repetition instance filter (data.instance_filter) and the loss's ignored targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdd_train.config import InstanceFilterConfig
from sdd_train.data.instance_filter import is_repetitive, longest_repetition
from sdd_train.data.loader import MixtureLoader
from sdd_train.kernels.cross_entropy import IGNORE, _cross_entropy_grad_fusible_, linear_cross_entropy, lm_loss

REFERENCE = InstanceFilterConfig(enabled=True, repetition_max_period=13, repetition_min_period=1,
                                 repetition_max_count=32)


def noise(n: int, seed: int) -> np.ndarray:
    """Tokens without repetition (all distinct): whatever is planted is the only repeat."""
    return np.random.default_rng(seed).permutation(np.arange(1000, 1000 + n))


def planted(gram: list[int], times: int, seed: int = 0, length: int = 600) -> np.ndarray:
    """``gram`` repeated ``times`` times in a row, in the middle of non-repeating tokens."""
    body = np.tile(np.asarray(gram), times)
    left = (length - len(body)) // 2
    base = noise(length - len(body), seed)
    return np.concatenate([base[:left], body, base[left:]])


def naive_longest_repetition(tokens: list[int], period: int) -> int:
    """The definition, by brute force: the most times a period-length n-gram occurs back to back."""
    best = 1
    for start in range(len(tokens)):
        times = 1
        while tokens[start + times * period:start + (times + 1) * period] == tokens[start:start + period] \
                and start + (times + 1) * period <= len(tokens):
            times += 1
        best = max(best, times)
    return best


def test_a_hand_built_instance():
    """The reference's 13 / 1 / 32: an n-gram of 1-13 tokens repeated 32 times in a row drops the
    instance; 31 times, a 14-token n-gram, or the repeats not in a row do not."""
    assert is_repetitive(planted([7, 8], 32), REFERENCE)
    assert not is_repetitive(planted([7, 8], 31), REFERENCE)
    assert is_repetitive(planted([5], 32), REFERENCE)  # one token 32 times
    assert is_repetitive(planted(list(range(13)), 32, length=800), REFERENCE)
    assert not is_repetitive(planted(list(range(14)), 40, length=800), REFERENCE)  # period 14: not looked for
    spaced = np.concatenate([np.concatenate([[7, 8], noise(3, i)]) for i in range(40)])
    assert not is_repetitive(spaced, REFERENCE)
    assert not is_repetitive(noise(600, 1), REFERENCE)
    # min_period 2: one token 40 times is also "aa" 20 times, fewer than 32
    assert not is_repetitive(planted([5], 40), InstanceFilterConfig(True, 13, 2, 32))
    assert is_repetitive(planted([5], 64), InstanceFilterConfig(True, 13, 2, 32))
    # periods longer than a third of the instance are not looked for (as OLMo's search)
    twice = InstanceFilterConfig(True, 13, 1, 2)
    assert not is_repetitive(np.array([1, 2, 3, 4, 1, 2, 3, 4]), twice)  # 8 tokens: periods up to 2
    assert is_repetitive(np.array([1, 2, 1, 2, 3, 4]), twice)


def test_the_search_equals_the_definition_by_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(200):
        tokens = rng.integers(0, 3, size=int(rng.integers(5, 60)))  # three symbols: repeats everywhere
        for period in (1, 2, 3, 5):
            assert longest_repetition(tokens, period) == naive_longest_repetition(tokens.tolist(), period), \
                (trial, period, tokens)


class Split:
    """A token split as the loader reads one (n_instances, instance): fixed rows, to plant a repeat."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows

    def n_instances(self, seq_len: int) -> int:
        return len(self.rows)

    def instance(self, i: int, seq_len: int) -> np.ndarray:
        return self.rows[i]


def test_the_loader_ignores_the_targets_of_repetitive_instances_only():
    rows = np.stack([noise(65, i) for i in range(8)])
    rows[3, 10:42] = 9  # one token 32 times
    plain = MixtureLoader([Split(rows)], [1.0], 64, 0, eos_id=0)
    filtered = MixtureLoader([Split(rows)], [1.0], 64, 0, eos_id=0, instance_filter=REFERENCE)
    want, got = plain.batch(0, 0, 8), filtered.batch(0, 0, 8)
    repetitive = (want["inputs"] == 9).sum(dim=1) > 0
    assert repetitive.sum() == 1
    assert torch.equal(got["inputs"], want["inputs"])
    assert (got["targets"][repetitive] == IGNORE).all()
    assert torch.equal(got["targets"][~repetitive], want["targets"][~repetitive])
    off = MixtureLoader([Split(rows)], [1.0], 64, 0, eos_id=0, instance_filter=InstanceFilterConfig(enabled=False))
    assert torch.equal(off.batch(0, 0, 8)["targets"], want["targets"])


def reference_loss(logits: torch.Tensor, targets: torch.Tensor, z_weight: float) -> torch.Tensor:
    """OLMo's: the sum over the kept tokens of ce + w lse^2, divided by every token, in float64."""
    logits = logits.double()
    kept = targets != IGNORE
    ce = F.cross_entropy(logits[kept], targets[kept], reduction="sum")
    z = torch.logsumexp(logits[kept], dim=-1).square().sum()
    return (ce + z_weight * z) / targets.numel()


@pytest.mark.parametrize("path", ["plain", "chunked", "fusible"])
def test_ignored_targets_add_nothing_and_the_mean_divides_by_every_token(path):
    torch.manual_seed(0)
    n, d, vocab, w = 24, 16, 50, 1e-2
    hidden = torch.randn(n, d, dtype=torch.float64)
    head = torch.randn(vocab, d, dtype=torch.float64) / 4
    targets = torch.randint(0, vocab, (n,))
    targets[5:13] = IGNORE
    h = hidden.clone().requires_grad_()
    want = reference_loss(h @ head.t(), targets, w)
    want.backward()
    if path == "plain":
        x = hidden.clone().requires_grad_()
        total = lm_loss(x @ head.t(), targets, w)[0]
        total.backward()
        got, grad = total, x.grad
    elif path == "chunked":
        x = hidden.clone().requires_grad_()
        total = linear_cross_entropy(x, head, targets, w, chunk_size=7)[0]
        total.backward()
        got, grad = total, x.grad
    else:  # the compiled form's math, run eagerly
        logits = (hidden @ head.t()).float()
        ce, z = _cross_entropy_grad_fusible_(logits, targets, w, n)
        got, grad = (ce + w * z) / n, logits.double() @ head
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), h.grad, rtol=1e-5, atol=1e-7)
    assert (grad[5:13] == 0).all()
