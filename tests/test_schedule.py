"""The learning-rate schedule against OLMo's CosWithWarmup, as the reference runs configure it."""

from __future__ import annotations

import math

import pytest

from conftest import TINY
from sdd_train.config import ConfigError, load_config
from sdd_train.train.schedules import lr_at


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


def schedule(*overrides: str):
    return load_config(TINY, ["optim.lr=1.0", "optim.warmup_steps=10", "optim.alpha_f=0.1", *overrides]).optim


def test_every_schedule_by_hand():
    """Steps are 0-based, the schedule reads the steps done including this one (t = step + 1); 10
    warmup steps, horizon 110 (the max_steps passed), floor 0.1."""
    linear = schedule("optim.schedule=linear")
    assert lr_at(4, linear, 110) == pytest.approx(0.5)  # the warmup is the same for all
    assert lr_at(59, linear, 110) == pytest.approx(1 - 0.9 * 50 / 100)
    assert lr_at(109, linear, 110) == pytest.approx(0.1) and lr_at(300, linear, 110) == pytest.approx(0.1)
    constant = schedule("optim.schedule=constant")
    assert [lr_at(s, constant, 110) for s in (9, 109, 10**6)] == [1.0, 1.0, 1.0]
    inverse_sqrt = schedule("optim.schedule=inverse_sqrt")
    assert lr_at(9, inverse_sqrt, 110) == 1.0
    assert lr_at(39, inverse_sqrt, 110) == pytest.approx(math.sqrt(10 / 40))
    assert lr_at(999, inverse_sqrt, 110) == pytest.approx(0.1)  # no floor, no horizon: t = 1000
    assert lr_at(3, schedule("optim.schedule=inverse_sqrt", "optim.warmup_steps=0"), 110) == pytest.approx(0.5)
    # wsd: 20% of 110 steps decay (from t = 88), the rest after the warmup stable at lr
    for shape, half_way in (("linear", 0.55), ("cosine", 0.55), ("1-sqrt", 1 - 0.9 * math.sqrt(0.5))):
        wsd = schedule("optim.schedule=wsd", f"optim.decay_shape={shape}")
        assert lr_at(9, wsd, 110) == 1.0 and lr_at(87, wsd, 110) == 1.0  # t = 88: the decay's start
        assert lr_at(98, wsd, 110) == pytest.approx(half_way)  # t = 99: 11 of its 22 steps
        assert lr_at(109, wsd, 110) == pytest.approx(0.1) and lr_at(500, wsd, 110) == pytest.approx(0.1)
    wsd_cos = schedule("optim.schedule=wsd", "optim.decay_shape=cosine")
    assert lr_at(92, wsd_cos, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 22)))
    steps = schedule("optim.schedule=wsd", "optim.decay_steps=30", "optim.horizon_steps=200")
    assert lr_at(169, steps, 110) == 1.0 and lr_at(184, steps, 110) == pytest.approx(0.55)  # t = 185: 15 of 30
    tokens = load_config(TINY, ["optim.lr=1.0", "optim.warmup_tokens=100", "optim.horizon_tokens=1000",
                                "optim.schedule=wsd", "optim.decay_fraction=0.5"]).optim
    assert lr_at(49, tokens, 10, 10) == 1.0 and lr_at(74, tokens, 10, 10) == pytest.approx(0.55)  # 10 tokens a step


@pytest.mark.parametrize("overrides,key", [
    (["optim.schedule=wsd", "optim.decay_fraction=0"], "optim.decay_fraction"),
    (["optim.schedule=wsd", "optim.decay_fraction=1.5"], "optim.decay_fraction"),
    (["optim.schedule=wsd", "optim.warmup_steps=130", "train.max_steps=150"], "optim.decay_fraction"),
    (["optim.schedule=wsd", "optim.decay_steps=0"], "optim.decay_steps"),
    (["optim.schedule=wsd", "optim.decay_steps=200", "train.max_steps=150"], "optim.decay_steps"),
    (["optim.schedule=exponential"], "optim.schedule"),
    (["optim.schedule=wsd", "optim.decay_shape=sqrt"], "optim.decay_shape"),
])
def test_bad_wsd_keys_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(TINY, overrides)


def test_dry_run_describes_and_draws_the_schedule(tmp_path, capsys):
    from sdd_train.train.__main__ import main

    png = tmp_path / "lr.png"
    args = [TINY, "optim.schedule=wsd", "optim.decay_shape=1-sqrt", "train.max_steps=100", "optim.warmup_steps=10",
            "--dry-run", "--plot-schedule", str(png)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "schedule: wsd; warmup 10 steps" in out and "stable to step 80, then a 1-sqrt decay" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*args[:-1], "/dev/null/lr.png"]) == 2  # an unwritable path: one line, exit 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("usage error: --plot-schedule: cannot write /dev/null/lr.png") and len(err.splitlines()) == 1, err
