"""Named validation sets: built from prepared token shards, evaluated in the loop and offline alike.

By default every training dataset contributes its held-out split, named after the dataset
(``stdlib`` for the embedded corpus). ``data.eval_sets`` names other prepared datasets instead
(``{name, path, split}``). Each set is ``train.eval_batches`` fixed batches of
``micro_batch_size x seq_len`` windows spread evenly over its split (only full batches, so a
compiled model sees one shape). With N ranks, rank r evaluates batches r, r+N, ...; the sums of
losses and token counts are all-reduced, so every world size gives the same numbers.

``sdd-eval PATH [--step N]`` evaluates a checkpoint on the run's sets with the same code, and with
``--downstream`` on OLMo's downstream tasks as the loop does (sdd_train/eval/downstream.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from sdd_train.config import ConfigError, RunConfig
from sdd_train.data.dataset import PreparedDataset
from sdd_train.data.loader import open_datasets, val_batches
from sdd_train.distributed.world import World, all_reduce_sum
from sdd_train.exit_codes import EXIT_OK, UsageError, report_usage_error
from sdd_train.kernels import autocast


@dataclass
class EvalSet:
    name: str
    batches: list[dict[str, torch.Tensor]]


def build_eval_sets(cfg: RunConfig, datasets: list[PreparedDataset], names: list[str], n_batches: int
                    ) -> list[EvalSet]:
    """The run's validation sets (see the module docstring); sets too short for one batch are left out."""
    t = cfg.train
    if cfg.data.eval_sets:
        sources = []
        for es, ds in zip(cfg.data.eval_sets, open_datasets([e.path for e in cfg.data.eval_sets])):
            if ds.meta["tokenizer"]["fingerprint"] != datasets[0].meta["tokenizer"]["fingerprint"]:
                raise ConfigError(f"data.eval_sets: '{es.name}' ({es.path}) was prepared with another tokenizer than"
                                  " the training data")
            sources.append((es.name, ds, ds.val if es.split == "val" else ds.train))
    else:
        sources = [(name, ds, ds.val) for name, ds in zip(names, datasets)]
    sets = []
    for name, ds, split in sources:
        batches = val_batches(split, t.seq_len, t.micro_batch_size, n_batches, ds.tokenizer.eos_id,
                              cfg.data.doc_mask)
        full = [b for b in batches if b["inputs"].shape[0] == t.micro_batch_size]
        if full or batches:
            sets.append(EvalSet(name, full or batches))
    return sets


@torch.no_grad()
def evaluate_sets(model: torch.nn.Module, sets: list[EvalSet], world: World, precision: str = "fp32",
                  loss_chunk: int = 0) -> dict[str, float]:
    """``val/<name>/loss`` and ``val/<name>/ppl`` per set, and ``val_loss``: the token mean over all sets.

    ``precision``: the run's (``train.precision``), so the loss is computed as the training step
    computes it. ``loss_chunk`` > 0 (``train.loss_chunk_size``): the fused head + loss, as in
    training, so the full logits never exist here either; 0: logits, then the plain loss.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(sets), 2, dtype=torch.float64, device=world.device)  # [loss sum, tokens]
    for i, s in enumerate(sets):
        rounds = math.ceil(len(s.batches) / world.world_size)
        for r in range(rounds):
            index = r * world.world_size + world.rank
            # every rank runs the same number of forwards (FSDP2 gathers parameters collectively)
            batch = s.batches[index] if index < len(s.batches) else s.batches[0]
            batch = {k: v.to(world.device) for k, v in batch.items()}
            with autocast(world.device, precision):
                ce = model(batch["inputs"], batch.get("doc_ids"), targets=batch["targets"], loss_chunk=loss_chunk).ce
            if index < len(s.batches):
                n = batch["targets"].numel()
                sums[i, 0] += ce.double() * n
                sums[i, 1] += n
    model.train(was_training)
    sums = all_reduce_sum(sums).tolist()
    out: dict[str, float] = {}
    for s, (loss_sum, count) in zip(sets, sums):
        loss = loss_sum / max(count, 1)
        out[f"val/{s.name}/loss"] = loss
        out[f"val/{s.name}/ppl"] = math.exp(min(loss, 50.0))
    total = sum(c for _, c in sums)
    out["val_loss"] = sum(ls for ls, _ in sums) / max(total, 1)
    out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
    return out


def evaluate_checkpoint(path: str | Path, step: int | None = None) -> dict[str, float]:
    """Offline: the validation losses of a checkpoint, with the batches the training loop used."""
    from sdd_train.eval.inference import LOCAL_WORLD, load_model, local_run_data

    loaded = load_model(path, step)
    cfg = loaded.cfg
    sets = build_eval_sets(cfg, *local_run_data(cfg), cfg.train.eval_batches)
    if not sets:
        raise ConfigError(f"{path}: no validation set holds a full sequence of {cfg.train.seq_len + 1} tokens")
    return evaluate_sets(loaded.model, sets, LOCAL_WORLD, cfg.train.precision, cfg.train.loss_chunk_size)


def evaluate_checkpoint_downstream(path: str | Path, step: int | None = None, tasks: list[str] | None = None,
                                   limit: int | None = None) -> dict[str, float]:
    """Offline: a checkpoint's downstream metrics, batched as the training loop batched them (the run's
    ``downstream.tasks`` and ``downstream.limit`` unless given)."""
    from sdd_train.eval.downstream import build_tasks, check_tasks, evaluate_tasks
    from sdd_train.eval.inference import LOCAL_WORLD, load_model

    check_tasks(tasks or [])  # before the model is read
    loaded = load_model(path, step)
    names = tasks or loaded.cfg.downstream.tasks
    if not names:
        raise ConfigError(f"{path}: the run has no downstream.tasks; name them: --downstream piqa,hellaswag")
    return evaluate_tasks(loaded.model, build_tasks(loaded.cfg, loaded.tokenizer, names, limit), LOCAL_WORLD,
                          loaded.cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdd-eval", description="Validation loss of a checkpoint on its run's"
                                     " validation sets (the in-loop ones), or its downstream task metrics.")
    parser.add_argument("path", help="run directory, checkpoint directory or sdd-export folder")
    parser.add_argument("--step", type=int, help="checkpoint step of a run directory (default: the latest)")
    parser.add_argument("--downstream", nargs="?", const="", metavar="TASKS",
                        help="OLMo's downstream tasks instead, comma-separated (alone: the run's downstream.tasks)")
    parser.add_argument("--limit", type=int, help="with --downstream: questions per task (default: the run's"
                        " downstream.limit; 0: all)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.downstream is None:
        parser.error("--limit needs --downstream")
    try:
        if args.downstream is None:
            result = evaluate_checkpoint(args.path, args.step)
        else:
            tasks = [name for name in args.downstream.split(",") if name] or None
            result = evaluate_checkpoint_downstream(args.path, args.step, tasks, args.limit)
    except UsageError as e:
        return report_usage_error(e)
    print(json.dumps(result, indent=1))
    return EXIT_OK


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
