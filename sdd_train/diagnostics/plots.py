"""Matplotlib figures of runs and sweeps (PNG): the paper's Figs. 3/5, 7, 9, 10 and Table 2 at any scale.

Every function takes already-read records (lists of dicts from the run's ``*.jsonl`` files), so
the figures can be tested and reused without a run directory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed (CI, clusters)
import matplotlib.pyplot as plt  # noqa: E402

LINEAR = ("att_proj", "attn_out", "ff_proj", "ff_out", "expert_proj", "expert_out", "router")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _grid(n: int, width: float = 4.2, height: float = 3.2):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def run_style(i: int) -> dict[str, str]:
    """The i-th run's line: matplotlib's ten colours, then again dashed, then dotted (13 schemes stay apart)."""
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":")[i // 10 % 3]}


def _cut_above(ax, lowest: float, top: float, note: str) -> None:
    """Stop the y axis at ``top`` (what rises above it would flatten the rest) and say so in the corner."""
    ax.set_ylim(lowest - 0.05 * (top - lowest), top)
    ax.text(0.01, 0.99, note, transform=ax.transAxes, va="top", fontsize=7)


def loss_curves(groups: dict[str, dict[str, list[dict[str, Any]]]], path: Path) -> Path:
    """One panel per group; per run its train loss (line) and validation loss (dots). A panel whose losses rise
    above 1.1 x the highest first loss (a blow-up) is cut there, so the other runs stay readable, and says so."""
    fig, axes = _grid(len(groups))
    for ax, (title, runs) in zip(axes, groups.items()):
        firsts, highest, lowest = [], -math.inf, math.inf
        for i, (name, records) in enumerate(runs.items()):
            style = run_style(i)
            train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
            val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
            if train:
                ax.plot(*zip(*train), lw=1.2, label=name, **style)
                firsts.append(train[0][1])
                highest = max(highest, max(loss for _, loss in train))
                lowest = min(lowest, min(loss for _, loss in train), *(loss for _, loss in val))
            if val:
                ax.plot(*zip(*val), "o", color=style["color"], ms=3)
        top = 1.1 * max(firsts, default=math.inf)
        if highest > top:
            _cut_above(ax, lowest, top, f"cut at {top:.3g} (highest loss {highest:.3g})")
        ax.set(title=title, xlabel="step", ylabel="loss (line: train, dots: val)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def downstream_curves(runs: dict[str, tuple[list[dict[str, Any]], int]], path: Path) -> Path | None:
    """One panel per downstream task: its primary metric (``downstream/<task>``) against training tokens, a
    line per run. ``runs``: name -> (metrics records, tokens per step)."""
    prefix = "downstream/"
    tasks = sorted({k[len(prefix):] for records, _ in runs.values() for r in records for k in r
                    if k.startswith(prefix) and "/" not in k[len(prefix):]})
    if not tasks:
        return None
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        for i, (name, (records, tokens_per_step)) in enumerate(runs.items()):
            points = [(r["step"] * tokens_per_step, r[prefix + task]) for r in records if prefix + task in r]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, lw=1.2, label=name, **run_style(i))
        ax.set(title=task, xlabel="tokens", ylabel="primary metric")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _families(records: list[dict[str, Any]]) -> tuple[list[str], int]:
    keys = {k for r in records for k in r if k.startswith("grad/layer_")}
    families = [f for f in LINEAR if any(k.endswith("/" + f) for k in keys)]
    layers = 1 + max((int(k.split("/")[1].removeprefix("layer_")) for k in keys), default=-1)
    return families, layers


def grad_norm_heatmaps(records: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Fig. 7: log10 gradient norm per layer (rows) and step (columns), one panel per linear family."""
    families, layers = _families(records)
    if not families or not layers:
        return None
    fig, axes = _grid(len(families))
    steps = [r["step"] for r in records]
    for ax, fam in zip(axes, families):
        grid = [[math.log10(max(r.get(f"grad/layer_{i}/{fam}", math.nan), 1e-30)) for r in records]
                for i in range(layers)]
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma",
                       extent=(steps[0], steps[-1], -0.5, layers - 0.5))
        ax.set(title=f"{title} {fam}".strip(), xlabel="step", ylabel="layer")
        ax.set_yticks(range(0, layers, max(1, layers // 8)))
        fig.colorbar(im, ax=ax, label="log10 grad norm")
    return _save(fig, path)


def grad_norm_by_layer(runs: dict[str, list[dict[str, Any]]], path: Path, last: int = 3) -> Path | None:
    """Gradient norm vs layer (mean of the last ``last`` records), one line per run, one panel per family."""
    families = sorted({f for recs in runs.values() for f in _families(recs)[0]}, key=LINEAR.index)
    if not families:
        return None
    fig, axes = _grid(len(families))
    for ax, fam in zip(axes, families):
        for i, (name, records) in enumerate(runs.items()):
            _, layers = _families(records)
            tail = records[-last:]
            ys = [sum(r.get(f"grad/layer_{j}/{fam}", math.nan) for r in tail) / max(len(tail), 1)
                  for j in range(layers)]
            if layers:
                ax.plot(range(layers), ys, marker="o", ms=3, label=name, **run_style(i))
        ax.set(title=fam, xlabel="layer", ylabel="grad norm", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def similarity_matrices(matrices: dict[str, Sequence[Sequence[float]]], path: Path) -> Path | None:
    """Fig. 9: cosine similarity between the hidden states of every pair of layers (0 = embedding)."""
    if not matrices:
        return None
    fig, axes = _grid(len(matrices), width=3.6, height=3.2)
    low = min(0.0, min(min(row) for m in matrices.values() for row in m))
    for ax, (name, matrix) in zip(axes, matrices.items()):
        im = ax.imshow(matrix, vmin=low, vmax=1.0, cmap="viridis", origin="lower")
        ax.set(title=name, xlabel="layer", ylabel="layer")
        fig.colorbar(im, ax=ax)
    return _save(fig, path)


def residual_rms(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Residual-stream RMS per layer at every recorded step."""
    if not records:
        return None
    fig, (ax,) = _grid(1, width=5.5)
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(records):
        ax.plot(range(len(r["rms"])), r["rms"], color=cmap(i / max(len(records) - 1, 1)), label=f"step {r['step']}")
    ax.set(xlabel="layer (0 = embedding)", ylabel="RMS of the residual stream", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def loss_vs_depth(rows: list[dict[str, Any]], line_axis: str, path: Path) -> Path:
    """Fig. 10: final loss against depth, one line per ``line_axis`` value; diverged runs as crosses. Where some
    lines sit far above the rest (schemes that never left the plateau), the axis is cut at the lowest loss + 3 x
    (the lines' median best - the lowest), and the plot names what lies above the cut."""
    fig, (ax,) = _grid(1, width=6.5, height=3.8)
    lines = list(dict.fromkeys(r[line_axis] for r in rows))
    ranges: dict[str, tuple[float, float]] = {}  # each line's lowest and highest finite loss
    for i, line in enumerate(lines):
        points = sorted((r["depth"], r) for r in rows if r[line_axis] == line)
        ok = [(d, r["loss"]) for d, r in points if not r["diverged"]]
        bad = [(d, r["loss"]) for d, r in points if r["diverged"] and math.isfinite(r["loss"])]
        style = run_style(i)
        if ok:
            ax.plot(*zip(*ok), marker="o", label=line, **style)
        if bad:
            ax.plot(*zip(*bad), "x", ms=9, color=style["color"], label=None if ok else line)
        finite = [loss for _, loss in ok + bad if math.isfinite(loss)]
        if finite:
            ranges[line] = min(finite), max(finite)
    ax.set(xlabel="layers", ylabel="final loss (validation if measured)", xscale="log")
    depths = sorted({r["depth"] for r in rows})
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    if ranges:
        bests = sorted(best for best, _ in ranges.values())
        top = bests[0] + max(3 * (bests[len(bests) // 2] - bests[0]), 0.3)
        above = [line for line, (_, highest) in ranges.items() if highest > top]
        if above:
            _cut_above(ax, bests[0], top, f"cut at {top:.3g}; above it: {', '.join(above)}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def table_image(cells: list[list[str]], row_labels: list[str], col_labels: list[str], bad: set[tuple[int, int]],
                path: Path, title: str = "") -> Path:
    """A rendered table (the paper's robustness table); cells in ``bad`` are shaded red."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.9 * len(col_labels), 0.6 + 0.45 * len(row_labels)), layout="constrained")
    ax.axis("off")
    colors = [["#f4b6b6" if (i, j) in bad else "#d9f2d9" for j in range(len(col_labels))]
              for i in range(len(row_labels))]
    table = ax.table(cellText=cells, rowLabels=row_labels, colLabels=col_labels, cellColours=colors, loc="center",
                     cellLoc="center")
    table.scale(1, 1.4)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def lr_schedule(curves: dict[str, list[tuple[int, float]]], path: Path, marks: Sequence[tuple[int, str]] = ()) -> Path:
    """Learning rate against the step, one line per schedule, with its phase boundaries marked."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
    for name, points in curves.items():
        ax.plot(*zip(*points), lw=1.4, label=name)
    for step, label in marks:
        ax.axvline(step, color="0.6", lw=0.8, ls="--")
        ax.annotate(label, (step, 0), xycoords=("data", "axes fraction"), xytext=(3, 4), textcoords="offset points",
                    fontsize=7, color="0.35")
    ax.set(xlabel="optimizer step", ylabel="learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def coordinate_check(results: dict[str, dict[int, list[dict[str, float]]]], families: Sequence[str], path: Path) -> Path:
    """µP's coordinate check: one row per parametrization, one panel per layer family, the mean change of
    its output since step 1 against width (log-log), one line per training step (from step 2)."""
    rows = list(results)
    fig, axes = plt.subplots(len(rows), len(families), figsize=(3.4 * len(families), 2.9 * len(rows)), squeeze=False,
                             layout="constrained")
    for r, name in enumerate(rows):
        widths = sorted(results[name])
        steps = len(results[name][widths[0]])
        for c, family in enumerate(families):
            ax = axes[r][c]
            for t in range(steps):
                ax.plot(widths, [results[name][w][t][family] for w in widths], marker="o", ms=3, lw=1.2,
                        color=plt.cm.viridis(t / max(steps - 1, 1)), label=f"step {t + 2}")
            ax.set(xscale="log", yscale="log", title=f"{name}: {family}", xlabel="width (d_model)")
            ax.set_xticks(widths, [str(w) for w in widths])
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel("mean |x_t - x_1|")
    axes[0][-1].legend(fontsize=7)
    return _save(fig, path)


def expert_load_heatmaps(records: list[dict[str, Any]], path: Path) -> Path | None:
    """One panel per MoE layer: each expert's share of the layer's routed pairs (colour) in each logging
    window (x, by its last step); an idle expert is a dark row, a collapsed router a single bright one."""
    if not records:
        return None
    layers = len(records[0]["share"])
    steps = [r["step"] for r in records]
    top = max(max(max(row) for row in r["share"]) for r in records)
    fig, axes = _grid(layers, width=4.0, height=2.8)
    for i, ax in enumerate(axes):
        grid = [[r["share"][i][e] for r in records] for e in range(len(records[0]["share"][i]))]
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma", interpolation="nearest", vmin=0, vmax=top,
                          extent=(0.5, len(steps) + 0.5, -0.5, len(grid) - 0.5))
        ticks = sorted({0, len(steps) - 1, (len(steps) - 1) // 2})
        ax.set_xticks([t + 1 for t in ticks], [str(steps[t]) for t in ticks])
        ax.set(title=f"layer {i}", xlabel="step", ylabel="expert")
        fig.colorbar(image, ax=ax, label="share of pairs")
    return _save(fig, path)


def loss_vs_lr(panels: dict[str, dict[str, list[tuple[float, float, bool]]]], path: Path) -> Path:
    """Final loss against learning rate (log), one panel per group, one line per value of the line axis, its
    best point a star; diverged runs as crosses."""
    fig, axes = _grid(len(panels), width=4.6, height=3.4)
    for ax, (title, lines) in zip(axes, panels.items()):
        for i, (label, points) in enumerate(lines.items()):
            points = sorted(points)
            ok = [(lr, loss) for lr, loss, diverged in points if not diverged and math.isfinite(loss)]
            bad = [(lr, loss) for lr, loss, diverged in points if diverged and math.isfinite(loss)]
            if ok:
                ax.plot(*zip(*ok), marker="o", ms=3, color=f"C{i}", label=label)
                ax.plot(*min(ok, key=lambda p: p[1]), "*", ms=12, color=f"C{i}")
            if bad:
                ax.plot(*zip(*bad), "x", ms=8, color=f"C{i}")
        ax.set(xscale="log", title=title, xlabel="learning rate", ylabel="final loss (validation if measured)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)
