"""Which checkpoint a run continues from (a resume, a rollback), and the config a checkpoint was
written with.

The newest checkpoint that verifies, loads and fits this run wins. One whose files fail
verification is moved aside (``step_N.corrupt``); one that cannot be verified (no manifest, or
verification off) and fails to load is skipped where it is; either is logged, returned as an
``events.jsonl`` record, and the one before it is tried; when none is left a CheckpointUnusable
names each one and why. One that does not fit this run moves nothing and is a ConfigError: the
run's command or machine changed, not its checkpoints. That covers other tensors, intact files that
fail to load, and a model config that computes other math (any model key but the kernel choices,
:data:`sdd_train.config.MODEL_KERNEL_KEYS`) unless ``train.allow_model_change`` says so (then the
change is logged and recorded as a ``model_changed`` event).

A run with no checkpoint of its own and ``train.init_from`` set starts from that checkpoint of another
run (a decay branch), under the same checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdd_train.checkpoint.storage import (CheckpointError, Checkpointer, CheckpointMismatch, checkpoint_dir,
                                          complete_checkpoints, first_of, read_meta)
from sdd_train.config import MODEL_KERNEL_KEYS, ConfigError, RunConfig, as_dict, config_from_dict
from sdd_train.distributed.world import broadcast_object
from sdd_train.exit_codes import CheckpointUnusable


def checkpoint_config(path: Path) -> RunConfig:
    """The run config ``path`` was written with (its ``meta.json``), typed and validated: the model a
    checkpoint holds, whatever the run's ``config.yaml`` says after a later resume changed it."""
    try:
        values = read_meta(path)["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointUnusable(f"{Path(path) / 'meta.json'}: holds no readable run config ({type(e).__name__}:"
                                 f" {e}); use another checkpoint (--step N, `sdd-ckpt list RUN_DIR`)") from None
    return config_from_dict(values, f"{Path(path) / 'meta.json'}: config")


# Sub-configs that only a setting uses: compared only when the checkpoint's model or this run's uses them
# (a dense model's model.moe.* computes nothing, so a changed MoE default must not stop its resume).
_USED_WHEN = {"model.moe.": ("model.ffn", "moe"), "model.spannorm.": ("model.block", "spannorm")}


def model_changes(path: Path, model: dict[str, Any]) -> list[str]:
    """How the resolved model config ``model`` differs from the one the checkpoint was written with,
    as ``model.key: there -> here`` (keys the checkpoint's config lacks are not compared: they came
    with a later version, nor the keys of a sub-config neither model uses); [] when its meta.json
    cannot be read (loading will say why)."""
    try:
        written = read_meta(path)["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return []

    def flat(d: dict[str, Any], prefix: str = "model.") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    there, here = flat(written), flat(model)

    def used(key: str) -> bool:
        prefix = next((p for p in _USED_WHEN if key.startswith(p)), None)
        if prefix is None:
            return True
        setting, value = _USED_WHEN[prefix]
        return value in (there.get(setting), here.get(setting))

    return [f"{k}: {there[k]!r} -> {here[k]!r}" for k in there if k in here and there[k] != here[k] and used(k)]


def optimizer_change(path: Path, name: str) -> str | None:
    """Why the checkpoint's optimizer state cannot continue as optimizer ``name`` (its meta.json names
    another ``optim.name``; checkpoints from before the key are AdamW's), or None."""
    try:
        written = read_meta(path)["config"]["optim"].get("name", "adamw")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if written == name:
        return None
    return (f"{path}: holds {written}'s optimizer state and this run sets optim.name={name}; one does not"
            f" continue as the other: keep optim.name={written}, or give this run another run_dir")


def math_changes(changes: list[str]) -> list[str]:
    """The entries of :func:`model_changes` that change what the model computes (not a kernel choice)."""
    return [c for c in changes if c.split(":", 1)[0] not in MODEL_KERNEL_KEYS]


@dataclass
class Restored:
    path: Path
    meta: dict[str, Any]  # what the checkpoint's meta.json holds (step, data position, callbacks' states)


@dataclass
class Restore:
    """The restore policy of one run: ``newest(load)`` finds and loads the checkpoint to continue from."""

    cfg: RunConfig
    checkpointer: Checkpointer
    log: Callable[..., None]
    events: list[dict[str, Any]] = field(default_factory=list)  # checkpoints set aside, changes allowed

    def newest(self, load: Callable[[Path], dict[str, Any]]) -> Restored | None:
        """Load (with ``load``) the newest usable checkpoint of the run; None when there is none."""
        t, failures, model = self.cfg.train, [], as_dict(self.cfg)["model"]
        for path in broadcast_object(complete_checkpoints(self.cfg.resolved_run_dir)[::-1]):
            problems = self.checkpointer.verify(path) if t.verify_checkpoints else None
            if t.verify_checkpoints and problems is None:
                self.log(f"warning: {path} is not verified: it has no manifest (written before checksums were recorded)"
                         " or its checksum algorithm is not installed (xxhash)")
            if problems:
                self._set_aside(path, first_of(problems), failures)
                continue
            changes = model_changes(path, model)
            if why := optimizer_change(path, self.cfg.optim.name):
                raise ConfigError(why)
            try:
                meta = load(path)
            except CheckpointError as e:
                if isinstance(e, CheckpointMismatch) or problems == []:  # readable or intact: the run changed
                    intact = "" if isinstance(e, CheckpointMismatch) else "its files are intact, but: "
                    diff = f"; model config, checkpoint -> this run: {', '.join(changes[:3])}" if changes else ""
                    raise ConfigError(f"{intact}{e}{diff}; resume with the config it was written with (its"
                                      " meta.json), or give this run another run_dir") from None
                # No checksums to say whether its files or this machine (memory, a timeout) failed: left in place.
                failures.append(f"{path.name}: {e}")
                self.log(f"warning: checkpoint {path} cannot be loaded ({e}) and has no checksums to tell whether"
                         " its files are damaged; left in place, trying the one before it")
                self.events.append({"event": "checkpoint_skipped", "checkpoint": path.name, "reason": str(e)})
                continue
            refused = math_changes(changes)
            if refused and not t.allow_model_change:  # the tensors fit; the math they were trained for differs
                raise ConfigError(f"{path}: written with another model config, checkpoint -> this run:"
                                  f" {', '.join(refused[:3])}; resume with the config it was written with (its"
                                  " meta.json), set train.allow_model_change=true to continue it as this model,"
                                  " or give this run another run_dir")
            if changes:
                self.log(f"warning: {path} was written with another model config ({', '.join(changes)});"
                         " continuing with this run's")
                self.events.append({"event": "model_changed", "checkpoint": path.name, "changes": changes})
            return Restored(path, meta)
        if failures:
            raise CheckpointUnusable(f"{checkpoint_dir(self.cfg.resolved_run_dir)}: no usable checkpoint"
                                     f" ({'; '.join(failures)}); damaged ones are kept as step_*.corrupt; delete the"
                                     " run directory to start over")
        return self._branch(load, model) if t.init_from else None

    def _branch(self, load: Callable[[Path], dict[str, Any]], model: dict[str, Any]) -> Restored:
        """This run's start from another run's checkpoint (``train.init_from``), held to the checks of a
        resume; that run's files are only read: a damaged one is an error here, not set aside."""
        path, t = Path(self.cfg.train.init_from), self.cfg.train
        fix = "; give train.init_from a complete step_N directory of another run (`sdd-ckpt list RUN_DIR`)"
        problems = self.checkpointer.verify(path) if t.verify_checkpoints else None
        if problems:
            raise CheckpointUnusable(f"train.init_from: {path}: {first_of(problems)}{fix}")
        changes = model_changes(path, model)
        refused = math_changes(changes)
        if refused and not t.allow_model_change:
            raise ConfigError(f"train.init_from: {path} was written with another model config, checkpoint -> this"
                              f" run: {', '.join(refused[:3])}; branch with the model it was trained as, or set"
                              " train.allow_model_change=true")
        try:
            meta = load(path)
        except CheckpointError as e:
            raise ConfigError(f"train.init_from: {path}: {e}{fix}") from None
        self.log(f"branch: this run starts from {path} (another run's step {meta['step']}), with this run's config")
        self.events.append({"event": "branched", "checkpoint": str(path), "from_step": meta["step"],
                            **({"changes": changes} if changes else {})})
        return Restored(path, meta)

    def _set_aside(self, path: Path, reason: str, failures: list[str]) -> None:
        moved = self.checkpointer.quarantine(path)
        failures.append(f"{path.name}: {reason}")
        self.log(f"warning: checkpoint {path} is unusable ({reason}); moved to {moved.name}, trying the one before it")
        self.events.append({"event": "checkpoint_rejected", "checkpoint": path.name, "moved_to": moved.name,
                            "reason": reason})

    def take_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events
