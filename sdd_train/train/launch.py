"""Starting a run: everything it needs is checked before anything is written, then it is assembled.

The checks, in order: the world (batch divisibility, the data-parallel mesh, W&B), the model's
scheme names, the run directory, the checkpoint a branch starts from, the callbacks' import paths,
the downstream tasks' names, the data (datasets, tokenizer and vocabulary, validation sets, the
downstream tasks' requests) and the model itself (built on the meta device). Each failure is a
:class:`~sdd_train.exit_codes.UsageError` (a ConfigError, DataError, BackendUnavailable, ...) naming
the key or file (exit code 2), and the run directory is untouched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from sdd_train.checkpoint import Checkpointer, is_complete_checkpoint
from sdd_train.checkpoint.restore import optimizer_change
from sdd_train.config import ConfigError, RunConfig
from sdd_train.config.validation import check_batch_split
from sdd_train.data.loader import MixtureLoader
from sdd_train.data.run_data import open_run_data
from sdd_train.distributed.expert_parallel import check_expert_shards
from sdd_train.distributed.world import World, barrier, close_world, init_world
from sdd_train.eval.downstream import build_tasks, check_tasks
from sdd_train.eval.validation import EvalSet, build_eval_sets
from sdd_train.kernels import BackendUnavailable, attention_backend_problem
from sdd_train.model import check_model_config
from sdd_train.train.callbacks import add_callback, build_callbacks
from sdd_train.train.callbacks.evaluation import DownstreamCallback
from sdd_train.train.callbacks.run_log import import_wandb
from sdd_train.train.data_feed import DataFeed
from sdd_train.train.train_module import TrainModule
from sdd_train.train.trainer import Trainer


def check_world(cfg: RunConfig, world: World) -> None:
    """The checks that need the world size."""
    t = cfg.train
    check_batch_split(t, world.world_size)
    if cfg.model.ffn == "moe":
        check_expert_shards((2 * cfg.model.moe.expert_hidden, cfg.model.d_model), world.dims)
    problem = attention_backend_problem(cfg.model.attention_backend, world.device, t.precision)
    if problem:
        raise BackendUnavailable(f"model.attention_backend: 'flash' {problem}; use 'auto' (flash-attn where it runs)")
    if cfg.logging.wandb != "disabled" and world.is_main:
        import_wandb(cfg.logging.wandb)


def check_run_dir(run_dir: Path) -> None:
    """The run directory can be created (or exists as a directory) and written."""
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            if not path.is_dir():
                what = "run_dir" if path == run_dir else f"run_dir: {path}, a parent of {run_dir},"
                raise ConfigError(f"{what} is a file, not a directory; set run_dir (or name) to a directory")
            if not os.access(path, os.W_OK | os.X_OK):
                raise ConfigError(f"run_dir: {path} is not writable; set run_dir to a directory you can write")
            return


def check_init_from(cfg: RunConfig) -> None:
    """``train.init_from`` names a checkpoint whose save finished, outside this run, written with this
    run's optimizer."""
    path = cfg.train.init_from
    if path is None:
        return
    if not is_complete_checkpoint(Path(path)):
        raise ConfigError(f"train.init_from: {path} is not a complete checkpoint (a step_N directory holding"
                          " meta.json); list a run's with `sdd-ckpt list RUN_DIR`")
    if Path(path).resolve().is_relative_to(cfg.resolved_run_dir.resolve()):
        raise ConfigError(f"train.init_from: {path} is in this run's own directory, which resumes by itself;"
                          " give this run another run_dir (or name)")
    if why := optimizer_change(Path(path), cfg.optim.name):
        raise ConfigError(f"train.init_from: {why}")


def build_trainer(cfg: RunConfig, world: World, log: Callable[..., None]) -> Trainer:
    t = cfg.train
    check_world(cfg, world)
    check_model_config(cfg.model)
    run_dir = cfg.resolved_run_dir
    check_run_dir(run_dir)
    check_init_from(cfg)
    callbacks = build_callbacks(cfg)
    downstream_interval = (cfg.downstream.interval or t.eval_interval) if cfg.downstream.tasks else 0
    if downstream_interval:
        check_tasks(cfg.downstream.tasks)
    datasets, names = open_run_data(cfg, log=log, is_main=world.is_main, barrier=barrier)
    tokenizer = datasets[0].tokenizer
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's"
                          f" {tokenizer.vocab_size} pieces ({tokenizer.model_file})")
    weights = [d.weight for d in cfg.data.datasets] if cfg.data.source == "prepared" else [1.0]
    loader = MixtureLoader([d.train for d in datasets], weights, t.seq_len, t.seed, tokenizer.eos_id, names,
                           cfg.data.doc_mask, cfg.data.instance_filter)
    eval_sets = _eval_sets(cfg, datasets, names, log)
    if downstream_interval:
        tasks = build_tasks(cfg, tokenizer)
        log("downstream: " + ", ".join(f"{task.name} ({task.n_docs} questions"
                                       + (f", {task.left_out} too long for train.seq_len" if task.left_out else "")
                                       + f"; {task.metric})" for task in tasks))
        callbacks = add_callback(callbacks, DownstreamCallback(tasks, downstream_interval))
    module = TrainModule(cfg, world)
    # ---- everything checked: nothing was written to the run directory before this line (config.yaml
    # follows once a resume has found a checkpoint that fits this config)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(run_dir, world, keep=t.keep_checkpoints,
                                permanent_every=t.permanent_checkpoint_interval,
                                async_save=t.async_checkpoint)
    feed = DataFeed(loader, cfg, world, cfg.data.prefetch)
    return Trainer(cfg, world, module, feed, loader, callbacks, checkpointer, eval_sets,
                   [d.fingerprint for d in datasets], log)


def _eval_sets(cfg: RunConfig, datasets, names: list[str], log: Callable[..., None]) -> list[EvalSet]:
    """The validation sets (their first batch is also the fixed batch of the activation statistics)."""
    t = cfg.train
    if not ((t.eval_batches and t.eval_interval) or cfg.diagnostics.activation_interval):
        return []
    sets = build_eval_sets(cfg, datasets, names, max(t.eval_batches, 1))
    if not sets:
        log(f"warning: no validation split holds {t.seq_len + 1} tokens; in-loop validation is off")
    return sets


def train(cfg: RunConfig, log: Callable[..., None] = print) -> Path:
    """Train ``cfg`` to ``train.max_steps`` (resuming if a checkpoint exists); return the run directory."""
    world = init_world(cfg.train.device, cfg.parallel)  # checks the data-parallel mesh
    try:  # a UsageError (bad config, data, checkpoint) passes to the command, which exits 2 with its one line
        return build_trainer(cfg, world, log if world.is_main else (lambda *a, **k: None)).fit()
    finally:
        close_world()
