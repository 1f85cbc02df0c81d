"""``sdd-coord-check``: µP's coordinate check (Yang et al. 2022, Fig. 5 and section D.1). The config's model is
trained a few steps at each of several widths (d_model and ffn_hidden scaled together, the heads
kept), once per parametrization, on one fixed batch; for each layer family the mean |x_t - x_1| of
its output after t - 1 updates is recorded, what training has changed in it. Under µP the curves over
width are flat; under SP they grow with width, because Adam moves every weight of a wider matrix by
as much and so its output by more.

    sdd-coord-check configs/tiny.yaml                         # widths 64..1024, sp and mup, PNG + JSON
    sdd-coord-check configs/tiny.yaml model.block=pre --widths 64 128 256 --steps 4 --out cc.png

The base width (``model.mup_base_width``) is the smallest width unless the config sets one, so both
parametrizations start from the same model there. Inputs are random tokens (the same at every width):
the check is about how the update scales with width, which any data shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sdd_train.config import RunConfig, load_config
from sdd_train.config.schema import PARAMETRIZATIONS
from sdd_train.exit_codes import EXIT_OK, UsageError, report_usage_error

FAMILIES = ("embedding", "attention", "ffn", "logits")
WIDTHS = (64, 128, 256, 512, 1024)


def width_config(config: str, overrides: list[str], width: int, parametrization: str, base_width: int) -> RunConfig:
    """The config's run at ``width``: ffn_hidden scaled with d_model (to a multiple of 8), fp32, eager."""
    base = load_config(config, overrides)
    ffn = max(8, round(base.model.ffn_hidden * width / base.model.d_model / 8) * 8)
    return load_config(config, [*overrides, f"model.d_model={width}", f"model.ffn_hidden={ffn}",
                                f"model.parametrization={parametrization}", f"model.mup_base_width={base_width}",
                                "train.precision=fp32", "train.compile=false"])


def activation_scales(cfg: RunConfig, steps: int, batch: int = 4) -> list[dict[str, float]]:
    """For steps 2..``steps``: each family's mean |output_t - output_1| (averaged over layers), the
    forward of step t on the same random-token batch after t - 1 updates at the schedule's peak lr."""
    from sdd_train.model import Transformer
    from sdd_train.train.optim import build_optimizer

    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    for group in optimizer.param_groups:
        group["lr"] = cfg.optim.lr * group.get("lr_scale", 1.0)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    tokens = torch.randint(cfg.model.vocab_size, (batch, cfg.train.seq_len + 1), generator=generator)
    outputs: dict[str, list[torch.Tensor]] = {}

    def record(family: str):
        def hook(module, inputs, output):
            outputs.setdefault(family, []).append((output[0] if isinstance(output, tuple) else output).detach())
        return hook

    handles = [model.embed.register_forward_hook(record("embedding"))]
    for block in model.blocks:
        handles.append(block.attention.register_forward_hook(record("attention")))
        handles.append(block.feed_forward.register_forward_hook(record("ffn")))
    first: dict[str, list[torch.Tensor]] = {}
    scales = []
    try:
        for step in range(steps):
            outputs.clear()
            logits = model(tokens[:, :-1])
            outputs["logits"] = [logits.detach()]
            F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step == 0:
                first = dict(outputs)
                continue
            scales.append({f: sum((x - x0).abs().mean().item() for x, x0 in zip(outputs[f], first[f])) / len(first[f])
                           for f in FAMILIES})
    finally:
        for handle in handles:
            handle.remove()
    return scales


def coord_check(config: str, overrides: list[str], widths: list[int], steps: int,
                parametrizations: tuple[str, ...] = PARAMETRIZATIONS) -> dict[str, dict[int, list[dict[str, float]]]]:
    """parametrization -> width -> per step, the families' activation scales."""
    base = load_config(config, overrides).model.mup_base_width or min(widths)
    return {p: {w: activation_scales(width_config(config, overrides, w, p, base), steps) for w in widths}
            for p in parametrizations}


def growth(results: dict[int, list[dict[str, float]]], family: str) -> float:
    """The last step's change at the widest width over that at the narrowest."""
    widths = sorted(results)
    return results[widths[-1]][-1][family] / results[widths[0]][-1][family]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdd-coord-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--steps", type=int, default=5, help="training steps recorded at each width")
    parser.add_argument("--out", type=Path, default=Path("coord_check.png"), help="the PNG (and its .json beside it)")
    args = parser.parse_args(argv)
    try:
        if args.steps < 2 or len(args.widths) < 2 or min(args.widths) <= 0:
            raise UsageError("--steps: at least 2 (step 1 is the init), and --widths: at least two positive widths")
        if not args.out.parent.is_dir() and not _can_create(args.out.parent):
            raise UsageError(f"--out: cannot create {args.out.parent}; give a PNG path in a writable directory")
        results = coord_check(args.config, args.overrides, sorted(set(args.widths)), args.steps)
    except UsageError as e:
        return report_usage_error(e)
    from sdd_train.diagnostics.plots import coordinate_check

    coordinate_check(results, FAMILIES, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(
        {p: {str(w): s for w, s in by_width.items()} for p, by_width in results.items()}, indent=1))
    lo, hi = min(args.widths), max(args.widths)
    print(f"mean |x_t - x_1| at width {hi} over width {lo}, t = {args.steps}:")
    for p, by_width in results.items():
        print(f"  {p:4s} " + "  ".join(f"{f} {growth(by_width, f):.2f}x" for f in FAMILIES))
    print(f"coordinate check: {args.out} (and {args.out.with_suffix('.json')})")
    return EXIT_OK


def _can_create(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return True
    except OSError:
        return False


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
