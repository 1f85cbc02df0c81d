"""Reading a run config: YAML composition through ``defaults:``, command-line overrides, typing.

A file may list other files under ``defaults:`` (paths relative to that file, without ``.yaml``);
they are merged first, in order, and the file's own keys win. On the command line
``dotted.key=value`` overrides a key, and ``group=name`` swaps the ``group/...`` entry of the
top-level defaults list (``block=sdd``). Every problem is a :class:`ConfigError` whose message
starts with the offending key or file, before any work starts; the CLIs turn it into exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdd_train.config.schema import ConfigError, RunConfig
from sdd_train.config.validation import validate


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry line numbers; keep them on one line
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return cfg


def _defaults_of(cfg: DictConfig, path: Path) -> list[str]:
    if "defaults" not in cfg:
        return []
    defaults = cfg.defaults
    if not OmegaConf.is_list(defaults) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"defaults: in {path} must be a list of file names like 'model/tiny'")
    return list(defaults)


def _compose(path: Path, swaps: dict[str, str], depth: int = 0) -> DictConfig:
    """Merge a file's defaults (recursively) under its own keys."""
    if depth > 16:
        raise ConfigError(f"defaults: nesting deeper than 16 at {path} (a cycle?)")
    cfg = _read_yaml(path)
    merged = OmegaConf.create({})
    for entry in _defaults_of(cfg, path):
        group = entry.split("/", 1)[0] if "/" in entry else None
        if depth == 0 and group in swaps:
            entry = f"{group}/{swaps[group]}"
        target = path.parent / f"{entry}.yaml"
        if not target.is_file():
            options = _group_options(path.parent, group)
            hint = f" (available: {', '.join(options)})" if options else ""
            raise ConfigError(f"defaults: '{entry}' not found as {target}{hint}")
        merged = OmegaConf.merge(merged, _compose(target, swaps, depth + 1))
    if "defaults" in cfg:
        cfg.pop("defaults")
    return OmegaConf.merge(merged, cfg)


def _group_options(root: Path, group: str | None) -> list[str]:
    if group is None or not (root / group).is_dir():
        return []
    return sorted(p.stem for p in (root / group).glob("*.yaml"))


def _one_line(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{key}: {first}" if key else first


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Compose, override, type-check and validate a run config. Raises ConfigError."""
    path = Path(path)
    if not _read_yaml(path):
        raise ConfigError(f"{path}: the config file is empty; a run config sets at least its model and training"
                          " keys or lists files under 'defaults:' (see configs/tiny.yaml)")
    dotted = [o for o in overrides if "=" in o and "." in o.split("=", 1)[0]]
    swaps: dict[str, str] = {}
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override '{o}': expected dotted.key=value (or group=name for a defaults group)")
        if o not in dotted:
            key, value = o.split("=", 1)
            top = {f.name for f in RunConfig.__dataclass_fields__.values()}
            if key in top:  # a top-level scalar such as name=foo
                dotted.append(o)
            else:
                swaps[key] = value
    raw = _compose(path, swaps)
    base_defaults = _defaults_of(_read_yaml(path), path)
    for group in swaps:
        if not any(d.startswith(group + "/") for d in base_defaults):
            raise ConfigError(
                f"override '{group}={swaps[group]}': '{group}' is neither a config key nor a defaults group of {path}"
            )
    schema = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(schema, raw)
        if dotted:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(dotted))
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    validate(cfg)
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def as_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def save_config(cfg: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)


def config_from_dict(values: dict[str, Any], source: str) -> RunConfig:
    """A run config from plain values (a checkpoint's ``meta.json``), through the same typed schema
    and rules as a YAML file; keys added to the schema since ``values`` were written take their
    defaults. Every problem is a ConfigError starting with ``source``."""
    try:
        cfg: RunConfig = OmegaConf.to_object(  # type: ignore[assignment]
            OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(values)))
        validate(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_one_line(e)}") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg
