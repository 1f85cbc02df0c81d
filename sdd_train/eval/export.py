"""``sdd-export RUN_DIR [--step N] [--out DIR]``: one consolidated safetensors file from a (sharded) checkpoint.

The output folder holds ``model.safetensors`` (full fp32 tensors, names as in
``Transformer.state_dict()``), ``config.yaml`` (the resolved config the checkpoint was written
with, from its meta.json) and ``tokenizer.model``,
enough to rebuild the model in any process with :func:`sdd_train.eval.inference.load_model`. Works for checkpoints written by any number of ranks.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from sdd_train.checkpoint import checkpoint_config, read_meta, read_model_state, resolve_checkpoint, verified
from sdd_train.config import save_config
from sdd_train.eval.inference import TOKENIZER_FILE, run_tokenizer
from sdd_train.exit_codes import EXIT_OK, UsageError, report_usage_error


def export(run_dir: Path, out: Path | None = None, step: int | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.yaml`` to ``out`` (default RUN_DIR/export/step_N); return it."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    ckpt = verified(resolve_checkpoint(run_dir, step))

    state = {k: v.contiguous() for k, v in read_model_state(ckpt).items()}
    out = Path(out) if out is not None else run_dir / "export" / ckpt.name
    out.mkdir(parents=True, exist_ok=True)
    meta = read_meta(ckpt)
    save_file(state, str(out / "model.safetensors"), metadata={"step": str(meta["step"]), "format": "pt"})
    cfg = checkpoint_config(ckpt)
    save_config(cfg, out / "config.yaml")
    shutil.copyfile(run_tokenizer(cfg).model_file, out / TOKENIZER_FILE)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdd-export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export/step_N)")
    args = parser.parse_args(argv)
    try:
        out = export(Path(args.run_dir), Path(args.out) if args.out else None, args.step)
    except UsageError as e:
        return report_usage_error(e)
    print(f"exported: {out / 'model.safetensors'}")
    return EXIT_OK


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
