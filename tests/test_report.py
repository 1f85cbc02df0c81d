"""sdd-report: on-demand activation statistics, run and sweep reports with their figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import SMALL_RUN, TINY, small_run
from sdd_train.diagnostics import report
from sdd_train.sweeps.grid import load_sweep
from sdd_train.sweeps.launch import write_manifest
from sdd_train.train.__main__ import main
from sdd_train.diagnostics.summary import EXIT_FILE, read_records


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000, path


def test_run_report_and_on_demand_activations_match_the_training_loop(tmp_path, data_cache):
    run = tmp_path / "run"
    assert main(small_run(run, data_cache, "train.max_steps=8", "train.precision=fp32", "train.eval_interval=4",
                          "diagnostics.layer_stats_interval=2", "diagnostics.activation_interval=4")) == 0
    in_loop = read_records(run / "activations.jsonl")
    assert [a["step"] for a in in_loop] == [4, 8]
    assert report.main([str(run), "--activations"]) == 0
    out = run / "report"
    (on_demand_file,) = out.glob("activations_step_*.json")
    on_demand = json.loads(on_demand_file.read_text())
    assert on_demand["step"] == 8
    assert on_demand["rms"] == pytest.approx(in_loop[-1]["rms"], rel=1e-5)
    assert on_demand["similarity"] == [pytest.approx(row, abs=1e-5) for row in in_loop[-1]["similarity"]]
    for name in ("loss.png", "grad_norms.png", "similarity.png", "residual_rms.png"):
        assert_png(out / name)
    text = (out / "report.md").read_text()
    assert "![Gradient norm per layer (Fig. 7)](grad_norms.png)" in text


def train_sweep(spec: dict, tmp_path: Path) -> None:
    """Train a sweep as `sdd-sweep run` trains and records its runs (tests/test_sweep.py), here in this
    process, then write its report."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    sweep = load_sweep(path)
    write_manifest(sweep)
    for run in sweep.runs:
        assert main([str(sweep.base), *run.overrides]) == 0
        (Path(run.run_dir) / EXIT_FILE).write_text("0\n")
    assert report.main([spec["out"]]) == 0


def test_sweep_report_renders_table_depth_and_similarity(tmp_path, data_cache):
    spec = {"name": "mini", "base": TINY, "out": str(tmp_path / "sweep"),
            "overrides": [*SMALL_RUN, f"data.cache_dir={data_cache}", "train.max_steps=4", "train.eval_interval=4",
                          "diagnostics.layer_stats_interval=2", "diagnostics.activation_interval=4"],
            "axes": [{"name": "block", "key": "model.block", "values": ["pre", "sdd"]},
                     {"name": "depth", "key": "model.n_layers", "values": [1, 2]}]}
    train_sweep(spec, tmp_path)
    out = tmp_path / "sweep" / "report"
    for name in ("table.png", "loss.png", "grad_by_layer_0.png", "similarity.png", "loss_vs_depth.png"):
        assert_png(out / name)
    text = (out / "report.md").read_text()
    assert "| block | depth1 | depth2 |" in text  # the pivot: rows block, columns depth
    assert "| pre-depth1 | pre | depth1 | 0 | 4 |" in text  # the results table


def test_sweep_report_of_a_learning_rate_sweep_names_each_lines_best_lr(tmp_path, data_cache):
    """An optim.lr axis: loss against lr, one line per width, and the best lr of each line in a table."""
    from sdd_train.diagnostics.summary import results

    spec = {"name": "lrs", "base": TINY, "out": str(tmp_path / "sweep"),
            "overrides": [*SMALL_RUN, f"data.cache_dir={data_cache}", "train.max_steps=3", "train.eval_interval=3"],
            "axes": [{"name": "width", "values": {"d32": ["model.d_model=32"], "d64": ["model.d_model=64"]}},
                     {"name": "lr", "key": "optim.lr", "values": [1e-3, 1e-2]}]}
    train_sweep(spec, tmp_path)
    assert_png(tmp_path / "sweep" / "report" / "loss_vs_lr.png")
    text = (tmp_path / "sweep" / "report" / "report.md").read_text()
    for width in ("d32", "d64"):
        best = min((r for r in results(tmp_path / "sweep") if r["width"] == width), key=lambda r: r["val_loss"])
        lr = {"lr0.001": "0.001", "lr0.01": "0.01"}[best["lr"]]
        assert f"| all runs | {width} | {lr} | {best['val_loss']:.4g} |" in text, text


def test_report_of_something_else_is_a_usage_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_the_depth_plot_cuts_off_the_lines_far_above_the_rest(tmp_path, monkeypatch):
    """Fig. 10 with schemes that never left the plateau: the axis stops at the lowest loss + 3 x (the lines'
    median best - the lowest), here 4.2 + 3 x 0.15, so the close lines stay readable, and names the lines cut."""
    from sdd_train.diagnostics import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    best = {"pre": 4.2, "sdd": 4.3, "post": 4.35, "rezero": 6.4}
    rows = [{"block": b, "depth": d, "loss": loss + 0.01 * i, "diverged": False}
            for b, loss in best.items() for i, d in enumerate((2, 4, 8))]
    plots.loss_vs_depth(rows, "block", tmp_path / "depth.png")
    ax = figures[0].axes[0]
    assert ax.get_ylim()[1] == pytest.approx(4.2 + 3 * (4.35 - 4.2))
    assert [t.get_text() for t in ax.texts] == ["cut at 4.65; above it: rezero"]
    figures.clear()
    plots.loss_vs_depth([r for r in rows if r["block"] != "rezero"], "block", tmp_path / "depth.png")
    assert not figures[0].axes[0].texts  # nothing far above: nothing cut
