"""``sdd-report DIR``: turn a run directory or a sweep directory into ``DIR/report/`` (Markdown + PNGs).

A run report has the loss curves, per-layer gradient-norm heatmaps, the downstream tasks' metrics
against tokens, the residual RMS per layer and the layer similarity matrix; ``--activations``
computes the activation statistics of a checkpoint on demand (the latest, or ``--checkpoint``). A
sweep report (a directory with ``sweep.json``) has the results table, loss curves per group, the
downstream tasks (a panel per task, every run on it), gradient norm vs layer, every run's similarity
matrix, loss vs depth when an axis sweeps ``model.n_layers`` and, for two axes, the rendered pivot table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from sdd_train.config import ConfigError
from sdd_train.diagnostics import plots
from sdd_train.diagnostics.activations import activation_stats
from sdd_train.diagnostics.summary import format_cell, read_records, results, summarise, write_table
from sdd_train.exit_codes import EXIT_OK, UsageError, report_usage_error

DEPTH_KEY = "model.n_layers"
LR_KEY = "optim.lr"


def _image(lines: list[str], title: str, path: Path | None, out: Path) -> None:
    if path is not None:
        lines += [f"### {title}", "", f"![{title}]({path.relative_to(out).as_posix()})", ""]


def tokens_per_step(run_dir: Path) -> int:
    """Training tokens an optimizer step consumes, from the run's config (0 when it has none)."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return 0
    train = OmegaConf.load(config).train
    return int(train.global_batch_size) * int(train.seq_len)


def _downstream(lines: list[str], runs: dict[str, Path], metrics: dict[str, list[dict[str, Any]]], out: Path
                ) -> None:
    curves = {name: (metrics[name], tokens_per_step(run_dir)) for name, run_dir in runs.items()}
    figure = plots.downstream_curves(curves, out / "downstream.png")
    _image(lines, "Downstream tasks (each task's primary metric vs training tokens)", figure, out)


# --------------------------------------------------------------------------- on-demand activations


@torch.no_grad()
def checkpoint_activations(run_dir: Path, checkpoint: Path | None = None) -> dict[str, Any]:
    """Activation statistics of a checkpoint on the run's fixed held-out batch (the in-loop one)."""
    from sdd_train.checkpoint import read_meta
    from sdd_train.eval.inference import load_model, local_run_data
    from sdd_train.eval.validation import build_eval_sets

    loaded = load_model(checkpoint or run_dir)
    cfg = loaded.cfg
    # the in-loop statistics' batch: the first of the validation sets the training loop builds
    sets = build_eval_sets(cfg, *local_run_data(cfg), max(cfg.train.eval_batches, 1))
    if not sets:
        raise ConfigError(f"{run_dir}: no validation split holds one sequence of {cfg.train.seq_len + 1} tokens")
    batch = sets[0].batches[0]
    stats = activation_stats(loaded.model, batch["inputs"], batch.get("doc_ids"), cfg.train.precision)
    return {"step": read_meta(loaded.source)["step"], "checkpoint": str(loaded.source), **stats}


# --------------------------------------------------------------------------- run report


def run_report(run_dir: Path, out: Path, on_demand: dict[str, Any] | None = None) -> Path:
    metrics = read_records(run_dir / "metrics.jsonl")
    layer = read_records(run_dir / "layer_stats.jsonl")
    acts = read_records(run_dir / "activations.jsonl")
    events = read_records(run_dir / "events.jsonl")
    if on_demand is not None:
        (out / f"activations_step_{on_demand['step']}.json").write_text(json.dumps(on_demand))
        acts = [a for a in acts if a["step"] != on_demand["step"]] + [on_demand]
    summary = summarise(run_dir)
    lines = [f"# Run report: {run_dir.name}", "", f"Run directory: `{run_dir}`", "",
             "| " + " | ".join(summary) + " |", "|" + "---|" * len(summary),
             "| " + " | ".join(format_cell(v) for v in summary.values()) + " |", ""]
    _image(lines, "Loss", plots.loss_curves({run_dir.name: {run_dir.name: metrics}}, out / "loss.png"), out)
    _image(lines, "Gradient norm per layer (Fig. 7)", plots.grad_norm_heatmaps(layer, out / "grad_norms.png"), out)
    _downstream(lines, {run_dir.name: run_dir}, {run_dir.name: metrics}, out)
    if acts:
        last = acts[-1]
        _image(lines, f"Layer similarity at step {last['step']} (Fig. 9)",
               plots.similarity_matrices({f"step {last['step']}": last["similarity"]}, out / "similarity.png"), out)
        _image(lines, "Residual-stream RMS per layer", plots.residual_rms(acts, out / "residual_rms.png"), out)
    moe = read_records(run_dir / "moe.jsonl")
    if moe:
        _moe_section(lines, metrics, moe, out)
    if events:
        lines += ["### Events", "", "| step | event | action | loss | grad norm |", "|---|---|---|---|---|"]
        lines += [f"| {e['step']} | {e['event']} | {e.get('action', '')} | {format_cell(e.get('loss'))} |"
                  f" {format_cell(e.get('grad_norm'))} |" for e in events]
        lines.append("")
    return _write(out, lines)


def _moe_section(lines: list[str], metrics: list[dict[str, Any]], moe: list[dict[str, Any]], out: Path) -> None:
    """MoE routing: the last logging window's diagnostics per layer, and the expert-load heat map."""
    last = next((m for m in reversed(metrics) if m.get("step") == moe[-1]["step"] and "loss" in m), {})
    lines += ["### MoE routing", "", f"Logging window ending at step {moe[-1]['step']} ({moe[-1]['steps']} steps):", "",
              "| layer | idle experts | most / least loaded | router logit RMS | load entropy |", "|---|---|---|---|---|"]
    for i in range(len(moe[-1]["share"])):
        key = f"moe/layer_{i}/"
        lines.append(f"| {i} | {format_cell(last.get(key + 'idle_experts'))} | {format_cell(last.get(key + 'load_ratio'))}"
                     f" | {format_cell(last.get(key + 'router_logit_rms'))} | {format_cell(last.get(key + 'load_entropy'))} |")
    lines.append("")
    _image(lines, "Expert load per layer (share of the routed pairs, per logging window)",
           plots.expert_load_heatmaps(moe, out / "expert_load.png"), out)


# --------------------------------------------------------------------------- sweep report


def _verdict(row: dict[str, Any]) -> str:
    loss = f"{row['final_loss']:.3f}" if math.isfinite(row["final_loss"]) else "-"
    if not row["diverged"]:
        return loss
    if not math.isfinite(row["final_loss"]) or row["exit"] == 3:
        return f"diverged @ {row['diverged_at']}"
    return f"no convergence ({loss})" if row["diverged_at"] <= 1 else f"{loss}, diverged @ {row['diverged_at']}"


def sweep_report(sweep_dir: Path, out: Path) -> Path:
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    axes = [a if isinstance(a, dict) else {"name": a, "key": None} for a in manifest["axes"]]
    names = [a["name"] for a in axes]
    md_table, _ = write_table(sweep_dir)
    rows = results(sweep_dir)
    runs = {r["name"]: Path(r["run_dir"]) for r in manifest["runs"]}
    labels = {r["name"]: r["labels"] for r in manifest["runs"]}
    lines = [f"# Sweep report: {manifest['name']}", "", f"Sweep directory: `{sweep_dir}`; base config"
             f" `{manifest['base']}`. Final loss = mean train loss of the last 5 logged steps.", "",
             "## Results", "", md_table.read_text(), ""]

    if len(axes) == 2:  # the robustness table: rows = first axis, columns = second axis
        row_labels = list(dict.fromkeys(r[names[0]] for r in rows))
        col_labels = list(dict.fromkeys(r[names[1]] for r in rows))
        by = {(r[names[0]], r[names[1]]): r for r in rows}
        cells = [[_verdict(by[(a, b)]) if (a, b) in by else "" for b in col_labels] for a in row_labels]
        bad = {(i, j) for i, a in enumerate(row_labels) for j, b in enumerate(col_labels)
               if (a, b) in by and by[(a, b)]["diverged"]}
        lines += [f"## {names[0]} x {names[1]} (final train loss; 'no convergence': never below diverge_loss)", "",
                  f"| {names[0]} | " + " | ".join(col_labels) + " |", "|---|" + "---|" * len(col_labels)]
        lines += [f"| {a} | " + " | ".join(c) + " |" for a, c in zip(row_labels, cells)]
        lines.append("")
        _image(lines, "Table", plots.table_image(cells, row_labels, col_labels, bad, out / "table.png",
                                                 manifest["name"]), out)

    # panels: one per combination of the axes after the first; lines: the first axis
    groups: dict[str, dict[str, str]] = {}
    for name, lab in labels.items():
        panel = " ".join(f"{k}={v}" for k, v in list(lab.items())[1:]) or manifest["name"]
        groups.setdefault(panel, {})[lab[names[0]]] = name
    curves = {panel: {line: read_records(runs[run] / "metrics.jsonl") for line, run in members.items()}
              for panel, members in groups.items()}
    _image(lines, "Loss curves", plots.loss_curves(curves, out / "loss.png"), out)
    _downstream(lines, runs, {name: read_records(run_dir / "metrics.jsonl") for name, run_dir in runs.items()}, out)
    for i, (panel, members) in enumerate(groups.items()):
        figure = plots.grad_norm_by_layer({line: read_records(runs[run] / "layer_stats.jsonl")
                                           for line, run in members.items()}, out / f"grad_by_layer_{i}.png")
        _image(lines, f"Gradient norm vs layer, {panel} (Fig. 7)", figure, out)
    matrices = {}
    for name, run_dir in runs.items():
        acts = read_records(run_dir / "activations.jsonl")
        if acts:
            matrices[f"{name} (step {acts[-1]['step']})"] = acts[-1]["similarity"]
    _image(lines, "Layer similarity (Fig. 9)", plots.similarity_matrices(matrices, out / "similarity.png"), out)

    depth_axis = next((a["name"] for a in axes if a["key"] == DEPTH_KEY), None)
    if depth_axis is not None:
        line_axis = next((n for n in names if n != depth_axis), depth_axis)
        points = []
        for r in rows:
            config = runs[r["run"]] / "config.yaml"
            if not config.is_file():
                continue
            loss = r["val_loss"] if math.isfinite(r["val_loss"]) else r["final_loss"]
            points.append({**r, "depth": int(OmegaConf.load(config).model.n_layers), "loss": loss})
        if points:
            _image(lines, "Final validation loss vs depth (Fig. 10)",
                   plots.loss_vs_depth(points, line_axis, out / "loss_vs_depth.png"), out)
    if any(a["key"] == LR_KEY for a in axes):
        _lr_section(lines, axes, rows, runs, out)
    return _write(out, lines)


def _lr_section(lines: list[str], axes: list[dict[str, Any]], rows: list[dict[str, Any]], runs: dict[str, Path],
                out: Path) -> None:
    """A learning-rate sweep: final loss against lr, one line per value of the last other axis (a width,
    say), one panel per combination of the rest (a parametrization), and each line's best lr: where
    it moves across lines, the lr does not transfer."""
    lr_axis = next(a["name"] for a in axes if a["key"] == LR_KEY)
    others = [a["name"] for a in axes if a["name"] != lr_axis]
    line_axis = others[-1] if others else lr_axis
    panels: dict[str, dict[str, list[tuple[float, float, bool]]]] = {}
    for r in rows:
        config = runs[r["run"]] / "config.yaml"
        if not config.is_file():
            continue
        loss = r["val_loss"] if math.isfinite(r["val_loss"]) else r["final_loss"]
        panel = " ".join(f"{n}={r[n]}" for n in others[:-1]) or "all runs"
        point = (float(OmegaConf.load(config).optim.lr), loss, bool(r["diverged"]))
        panels.setdefault(panel, {}).setdefault(str(r[line_axis]), []).append(point)
    if not panels:
        return
    lines += ["## Best learning rate (final validation loss)", "", f"| panel | {line_axis} | best lr | its loss |",
              "|---|---|---|---|"]
    for panel, by_line in panels.items():
        for line, points in by_line.items():
            ok = [p for p in points if not p[2] and math.isfinite(p[1])]
            best = min(ok, key=lambda p: p[1]) if ok else None
            lines.append(f"| {panel} | {line} | {format_cell(best[0]) if best else '-'} |"
                         f" {format_cell(best[1]) if best else '-'} |")
    lines.append("")
    _image(lines, "Final loss vs learning rate", plots.loss_vs_lr(panels, out / "loss_vs_lr.png"), out)


def _write(out: Path, lines: list[str]) -> Path:
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdd-report", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("directory", help="a run directory (metrics.jsonl) or a sweep directory (sweep.json)")
    parser.add_argument("--out", help="where to write the report (default DIR/report)")
    parser.add_argument("--activations", action="store_true",
                        help="compute activation statistics of a checkpoint now (run directories only)")
    parser.add_argument("--checkpoint", help="with --activations: this checkpoint instead of the latest")
    args = parser.parse_args(argv)
    directory = Path(args.directory)
    out = Path(args.out) if args.out else directory / "report"
    try:
        if not ((directory / "sweep.json").is_file() or (directory / "metrics.jsonl").is_file()):
            raise UsageError(f"{directory}: neither a run directory (metrics.jsonl) nor a sweep directory (sweep.json)")
        out.mkdir(parents=True, exist_ok=True)
        if (directory / "sweep.json").is_file():
            path = sweep_report(directory, out)
        else:
            on_demand = None
            if args.activations:
                on_demand = checkpoint_activations(directory, Path(args.checkpoint) if args.checkpoint else None)
                print(f"activations at step {on_demand['step']}: residual RMS per layer "
                      + " ".join(f"{v:.3g}" for v in on_demand["rms"]))
            path = run_report(directory, out, on_demand)
    except UsageError as e:
        return report_usage_error(e)
    print(f"wrote {path}")
    return EXIT_OK


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
