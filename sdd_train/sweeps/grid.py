"""Sweep files: a base run config, overrides and axes whose product is the grid of runs.

Every run's config is composed, resolved (``key*=factor``) and validated, the model's scheme names
included, when the sweep is loaded, before any run starts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sdd_train.config import ConfigError, as_dict, load_config
from sdd_train.model import check_model_config


@dataclass
class Axis:
    name: str
    points: dict[str, list[str]]  # label -> overrides
    key: str | None = None  # set when the axis sweeps one config key


@dataclass
class Run:
    name: str
    labels: dict[str, str]  # axis name -> point label
    overrides: list[str]  # resolved: every '*=' replaced by '='
    run_dir: str


@dataclass
class Sweep:
    name: str
    base: Path
    out: Path
    overrides: list[str]
    axes: list[Axis]
    diverge_loss: float | None = None
    runs: list[Run] = field(default_factory=list)


def _label(axis: str, value: Any) -> str:
    text = str(value)
    return f"{axis}{text}" if isinstance(value, (int, float)) and not isinstance(value, bool) else text


def _axis(i: int, raw: Any) -> Axis:
    where = f"axes.{i}"
    if not isinstance(raw, dict) or "name" not in raw or "values" not in raw:
        raise ConfigError(f"{where}: each axis needs 'name' and 'values' (and 'key' when values is a list)")
    unknown = set(raw) - {"name", "key", "values"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; allowed: name, key, values")
    name, key, values = str(raw["name"]), raw.get("key"), raw["values"]
    if isinstance(values, list):
        if not key:
            raise ConfigError(f"{where}.key: a list of values needs the config key they set (e.g. key: model.block)")
        if not values:
            raise ConfigError(f"{where}.values: empty")
        points = {_label(name, v): [f"{key}={v}"] for v in values}
    elif isinstance(values, dict):
        if key:
            raise ConfigError(f"{where}.key: named points carry their own overrides; drop 'key'")
        points = {}
        for label, overrides in values.items():
            if overrides is None:
                overrides = []
            if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
                raise ConfigError(f"{where}.values.{label}: must be a list of 'key=value' or 'key*=factor' strings")
            points[str(label)] = list(overrides)
    else:
        raise ConfigError(f"{where}.values: a list (with 'key') or a mapping label -> overrides")
    if len(points) != len(values):
        raise ConfigError(f"{where}.values: two values give the same run label")
    return Axis(name=name, points=points, key=key)


def _resolve(base: Path, overrides: list[str]) -> list[str]:
    """Replace every ``key*=factor`` by ``key=<value the run would have> * factor``; validate the result."""
    plain = [o for o in overrides if "*=" not in o]
    if len(plain) == len(overrides):
        check_model_config(load_config(base, plain).model)
        return overrides
    resolved: list[str] = []
    for o in overrides:
        if "*=" not in o:
            resolved.append(o)
            continue
        key, factor = o.split("*=", 1)
        try:
            factor_value = float(factor)
        except ValueError:
            raise ConfigError(f"override '{o}': the factor after '*=' must be a number") from None
        current = OmegaConf.select(OmegaConf.create(as_dict(load_config(base, resolved))), key,
                                   throw_on_missing=False, default="__missing__")
        if current == "__missing__":
            raise ConfigError(f"override '{o}': '{key}' is not a config key")
        if not isinstance(current, (int, float)) or isinstance(current, bool):
            raise ConfigError(f"override '{o}': '{key}' is {current!r}, not a number that can be multiplied")
        value = current * factor_value
        resolved.append(f"{key}={int(value) if isinstance(current, int) and value.is_integer() else value!r}")
    check_model_config(load_config(base, resolved).model)  # every run's config must load before anything starts
    return resolved


def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep file and expand its grid (every run's config is loaded once)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    unknown = set(raw) - {"name", "base", "out", "overrides", "axes", "diverge_loss"}
    if unknown:
        raise ConfigError(f"{', '.join(sorted(unknown))}: unknown sweep field(s) in {path}; allowed: name, base, out,"
                          " overrides, axes, diverge_loss")
    for key in ("name", "base", "axes"):
        if key not in raw:
            raise ConfigError(f"{key}: missing in {path}")
    if not isinstance(raw["axes"], list) or not raw["axes"]:
        raise ConfigError(f"axes: in {path} must be a non-empty list of axes")
    name = str(raw["name"])
    sweep = Sweep(name=name, base=(path.parent / str(raw["base"])).resolve(),
                  out=Path(raw.get("out") or Path("runs") / "sweeps" / name),
                  overrides=[str(o) for o in raw.get("overrides") or []],
                  axes=[_axis(i, a) for i, a in enumerate(raw["axes"])],
                  diverge_loss=float(raw["diverge_loss"]) if raw.get("diverge_loss") is not None else None)
    if not sweep.base.is_file():
        raise ConfigError(f"base: {sweep.base} not found (paths are relative to {path})")
    names = [a.name for a in sweep.axes]
    if len(set(names)) != len(names):
        raise ConfigError(f"axes: two axes are named the same ({', '.join(names)})")
    for combo in itertools.product(*(a.points.items() for a in sweep.axes)):
        labels = {axis.name: label for axis, (label, _) in zip(sweep.axes, combo)}
        run_name = "-".join(labels.values())
        overrides = sweep.overrides + [o for _, point in combo for o in point]
        try:
            resolved = _resolve(sweep.base, overrides)
        except ConfigError as e:
            raise ConfigError(f"run {run_name}: {e}") from None
        run_dir = sweep.out / run_name
        sweep.runs.append(Run(run_name, labels, resolved + [f"run_dir={run_dir}", f"name={run_name}"], str(run_dir)))
    return sweep
