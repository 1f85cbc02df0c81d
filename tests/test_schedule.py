"""The learning-rate schedule against OLMo's CosWithWarmup, as the reference runs configure it."""

from __future__ import annotations

import math

import pytest

from conftest import TINY
from sdd_train.config import ConfigError, load_config
from sdd_train.train.optim import lr_at


def olmo_cos_with_warmup(lr: float, t: float, warmup: float, horizon: float, alpha_f: float,
                         warmup_min_lr: float) -> float:
    """OLMo's scheduler read off its source: ``t`` counts the tokens (or steps) done including this step."""
    eta_min = lr * alpha_f
    if t < warmup:
        return warmup_min_lr + (lr - warmup_min_lr) * min(t, warmup) / warmup
    if t >= horizon:
        return eta_min
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * (t - warmup) / (horizon - warmup))) / 2


def test_steps_schedule_reaches_the_floor_at_the_last_step():
    cfg = load_config(TINY, ["optim.lr=1.0", "optim.warmup_steps=10", "optim.alpha_f=0.1"]).optim
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)  # step 1 of 10 warmup steps
    assert lr_at(9, cfg, 110) == 1.0  # the warmup's last step trains at lr
    assert lr_at(59, cfg, 110) == pytest.approx(0.55)  # 50 of the 100 decay steps done: half-way down
    assert lr_at(109, cfg, 110) == pytest.approx(0.1)  # the last of 110 steps trains at alpha_f * lr
    assert lr_at(500, cfg, 110) == pytest.approx(0.1)
    for step in (0, 5, 9, 10, 11, 37, 108, 109):
        assert lr_at(step, cfg, 110) == pytest.approx(olmo_cos_with_warmup(1.0, step + 1, 10, 110, 0.1, 0.0),
                                                      rel=1e-12), step
    no_warmup = load_config(TINY, ["optim.lr=1.0", "optim.warmup_steps=0"]).optim
    assert lr_at(0, no_warmup, 100) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 100)) / 2)


def test_reference_dense_schedule_in_tokens():
    """dense/run.sh: t_warmup 8388608000 tokens, t_max 2e12 tokens, warmup_min_lr 0, alpha_f 0.1, 4,194,304 tokens a step."""
    cfg = load_config(TINY, ["optim.lr=3e-4", "optim.warmup_tokens=8388608000", "optim.horizon_tokens=2e12",
                             "optim.alpha_f=0.1"]).optim
    tps = 1024 * 4096
    for step in (0, 1, 999, 1998, 1999, 2000, 2001, 47683, 476836, 476837):
        expected = olmo_cos_with_warmup(3e-4, (step + 1) * tps, 8388608000, 2e12, 0.1, 0.0)
        assert lr_at(step, cfg, 47684, tps) == pytest.approx(expected, rel=1e-12), step
    assert lr_at(0, cfg, 47684, tps) == pytest.approx(1.5e-7)
    assert lr_at(1999, cfg, 47684, tps) == pytest.approx(3e-4)
    assert lr_at(47683, cfg, 47684, tps) == pytest.approx(2.9388e-4, rel=1e-4)  # 200B of a 2T horizon: 98% of lr
    assert lr_at(10**6, cfg, 47684, tps) == pytest.approx(3e-5)


def test_reference_moe_schedule_warms_up_from_a_tenth():
    """moe yml: t_warmup 1.048576e10 tokens, warmup_min_lr unset (OLMo: 0.1 lr), t_max 5e12 tokens."""
    cfg = load_config(TINY, ["optim.lr=4e-4", "optim.warmup_tokens=1.048576e10", "optim.warmup_start=0.1",
                             "optim.horizon_tokens=5e12"]).optim
    tps = 1024 * 4096
    assert lr_at(0, cfg, 10, tps) == pytest.approx(4e-5 + 3.6e-4 / 2500)
    for step in (0, 1249, 2498, 2499, 2500, 59604, 119209):
        expected = olmo_cos_with_warmup(4e-4, (step + 1) * tps, 1.048576e10, 5e12, 0.1, 4e-5)
        assert lr_at(step, cfg, 10, tps) == pytest.approx(expected, rel=1e-12), step


def test_horizon_in_steps_is_independent_of_max_steps():
    cfg = load_config(TINY, ["optim.lr=1.0", "optim.warmup_steps=10", "optim.horizon_steps=1010"]).optim
    for max_steps in (20, 110, 5000):
        assert lr_at(509, cfg, max_steps) == pytest.approx(0.55)
    assert lr_at(5000, cfg, 20) == pytest.approx(0.1)


@pytest.mark.parametrize("overrides,key", [
    (["optim.horizon_steps=100", "optim.horizon_tokens=1e9"], "optim.horizon_tokens"),
    (["optim.warmup_steps=100", "optim.horizon_steps=100"], "optim.horizon_steps"),
    (["optim.warmup_tokens=1e9", "optim.horizon_tokens=1e8"], "optim.horizon_tokens"),
    (["optim.warmup_start=1.0"], "optim.warmup_start"),
    (["optim.warmup_tokens=-1"], "optim.warmup_tokens"),
])
def test_bad_schedule_keys_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(TINY, overrides)
