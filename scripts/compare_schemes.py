"""Train one config once per block scheme and print a Markdown table of the final losses.

    python scripts/compare_schemes.py [--config configs/tiny.yaml] [--blocks pre sdd ...] [overrides ...]

Each scheme runs as its own ``sdd-train`` process in ``runs/schemes/<block>`` (re-running resumes
or skips finished runs), so one diverging scheme does not stop the others.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdd_train.model import BLOCKS  # noqa: E402
from sdd_train.train.metrics import read_metrics  # noqa: E402


def summarise(run_dir: Path) -> dict:
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    tail = train[-5:]
    return {
        "steps": train[-1]["step"] if train else 0,
        "loss": sum(r["loss"] for r in tail) / len(tail) if tail else float("nan"),
        "val_loss": val[-1]["val_loss"] if val else float("nan"),
        "max_grad_norm": max((r["grad_norm"] for r in train), default=float("nan")),
        "tokens_per_sec": sum(r["tokens_per_sec"] for r in tail) / len(tail) if tail else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--blocks", nargs="+", default=list(BLOCKS))
    parser.add_argument("--out", default="runs/schemes")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    rows = []
    for block in args.blocks:
        run_dir = Path(args.out) / block
        cmd = [sys.executable, "-m", "sdd_train.train", args.config, f"model.block={block}", f"run_dir={run_dir}",
               *args.overrides]
        print("$", " ".join(cmd), flush=True)
        code = subprocess.run(cmd).returncode
        rows.append({"block": block, "exit": code, **summarise(run_dir)})

    print("\n| block | exit | steps | train loss (last 5 logged) | val loss | max grad norm | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['block']} | {r['exit']} | {r['steps']} | {r['loss']:.4f} | {r['val_loss']:.4f} |"
              f" {r['max_grad_norm']:.2f} | {r['tokens_per_sec']:,.0f} |")


if __name__ == "__main__":
    main()
