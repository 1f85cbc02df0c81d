"""Callbacks: everything around the step that the loop does not do itself.

Built in, in the order of their priorities: stability (non-finite steps, loss spikes), layer
statistics, speed, the router (MoE runs), evaluation, downstream tasks (added once the tokenizer is
known), activation statistics, checkpointing (with
SIGTERM/SIGUSR1), the run log (files, W&B, console), the profiler (``train.profile``). A run adds its own from the config by import path (``callbacks: [{path:
pkg.mod:Class, options: {...}}]``); they run by their ``priority`` too (default 0: after the
built-in ones; docs/callbacks.md).
"""

from __future__ import annotations

import importlib

from sdd_train.config import CallbackConfig, ConfigError, RunConfig
from sdd_train.train.callbacks.base import Action, Callback, Verdict
from sdd_train.train.callbacks.checkpointing import CheckpointCallback
from sdd_train.train.callbacks.evaluation import EvaluationCallback
from sdd_train.train.callbacks.profiler import ProfilerCallback
from sdd_train.train.callbacks.router import RouterCallback
from sdd_train.train.callbacks.run_log import RunLogCallback
from sdd_train.train.callbacks.speed import SpeedCallback
from sdd_train.train.callbacks.stability import StabilityCallback
from sdd_train.train.callbacks.statistics import ActivationsCallback, LayerStatsCallback

__all__ = ["Action", "Callback", "Verdict", "add_callback", "build_callbacks", "load_callback"]


def load_callback(i: int, spec: CallbackConfig) -> Callback:
    """Import ``spec.path`` ('package.module:Class' or 'package.module.Class') and build it with its options."""
    key = f"callbacks.{i}.path"
    module_name, sep, attr = spec.path.partition(":")
    if not sep:
        module_name, _, attr = spec.path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError, TypeError) as e:
        raise ConfigError(f"{key}: cannot import '{spec.path}' ({type(e).__name__}: {e}); is its package on the"
                          " Python path?") from None
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise ConfigError(f"{key}: '{spec.path}' is not a subclass of sdd_train.train.callbacks.Callback")
    try:
        return cls(**spec.options)
    except TypeError as e:
        raise ConfigError(f"callbacks.{i}.options: {spec.path}: {e}") from None


def build_callbacks(cfg: RunConfig) -> list[Callback]:
    """The run's callbacks, highest ``priority`` first (a stable sort: equal ones keep this order)."""
    t, diag = cfg.train, cfg.diagnostics
    callbacks: list[Callback] = [StabilityCallback(cfg), SpeedCallback(), CheckpointCallback(), RunLogCallback()]
    if diag.layer_stats_interval:
        callbacks.append(LayerStatsCallback(diag.layer_stats_interval))
    if t.eval_interval and t.eval_batches:
        callbacks.append(EvaluationCallback(t.eval_interval))
    if diag.activation_interval:
        callbacks.append(ActivationsCallback(diag.activation_interval))
    if cfg.model.ffn == "moe":
        callbacks.append(RouterCallback())
    if t.profile.steps:
        callbacks.append(ProfilerCallback(t.profile))
    return add_callback(callbacks, *(load_callback(i, spec) for i, spec in enumerate(cfg.callbacks)))


def add_callback(callbacks: list[Callback], *more: Callback) -> list[Callback]:
    """``callbacks`` and ``more``, highest ``priority`` first (a stable sort), each name once."""
    callbacks = sorted([*callbacks, *more], key=lambda c: -c.priority)
    names = [c.name for c in callbacks]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"callbacks: two callbacks are named '{duplicate}'; the name keys each one's state in"
                          " checkpoints, so give yours another (class attribute `name`)")
    return callbacks
