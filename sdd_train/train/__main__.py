"""``sdd-train CONFIG.yaml [dotted.key=value | group=name ...]`` (also ``python -m sdd_train.train``).

Exit codes (:mod:`sdd_train.exit_codes`): 0 success, 2 a configuration, data, checkpoint or usage error
(any :class:`~sdd_train.exit_codes.UsageError`, printed as one line), 3 divergence (NaN/Inf), 1 anything
else (a failed checkpoint save among them).
"""

from __future__ import annotations

import argparse
import os
import sys

from sdd_train.config import load_config, to_yaml
from sdd_train.exit_codes import EXIT_DIVERGED, EXIT_FAILURE, EXIT_OK, UsageError, report_usage_error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sdd-train",
        description="Train a transformer from a YAML config. Re-running the same command resumes the run.",
        epilog="examples: sdd-train configs/tiny.yaml model.block=sdd train.max_steps=100 | "
        "sdd-train configs/tiny.yaml block=sdd",
    )
    parser.add_argument("config", help="run config YAML (may pull others through 'defaults:')")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, or group=name to swap a defaults entry")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, the model size and the learning-rate schedule, then exit")
    parser.add_argument("--plot-schedule", metavar="PNG", help="with --dry-run: also draw the learning rate of"
                        " every step to this PNG")
    plan = parser.add_argument_group("planning (nothing is trained or written)")
    plan.add_argument("--estimate-memory", action="store_true",
                      help="estimate each rank's peak memory in a training step (fake tensors, a fake process group)")
    plan.add_argument("--estimate-step", metavar="DEVICE", choices=("h100", "h200", "a100", "cpu"),
                      help="estimate a step's time and MFU on DEVICE (h100, h200, a100, or cpu: this machine,"
                      " measured), with the memory estimate it needs")
    plan.add_argument("--world-size", type=int, default=1, metavar="N",
                      help="with --estimate-memory or --estimate-step: ranks (default 1)")
    plan.add_argument("--device-memory-gib", type=float, metavar="M",
                      help="with --estimate-memory: the device's memory; adds whether the run fits and the largest"
                      " micro-batch that does")
    plan.add_argument("--reserve-gib", type=float, default=2.0, metavar="R",
                      help="with --device-memory-gib: memory kept free for the CUDA context and the allocator"
                      " (default 2)")
    args = parser.parse_args(argv)
    if args.plot_schedule and not args.dry_run:
        parser.error("--plot-schedule goes with --dry-run")
    planning = args.estimate_memory or args.estimate_step
    if not planning and (args.world_size != 1 or args.device_memory_gib is not None):
        parser.error("--world-size and --device-memory-gib go with --estimate-memory or --estimate-step")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Under torchrun every rank reaches the same verdict; rank 0 reports it.
    report = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.estimate_memory or args.estimate_step:  # planning: nothing is trained or written
            from sdd_train.plan.memory import planning_report

            print(planning_report(cfg, args.world_size, args.estimate_memory, args.estimate_step,
                                  args.device_memory_gib, args.reserve_gib))
            return EXIT_OK
        if args.dry_run:
            import torch

            from sdd_train.model import Transformer
            from sdd_train.train import optim
            from sdd_train.train.schedules import describe, plot

            print(to_yaml(cfg))
            with torch.device("meta"):
                model = Transformer(cfg.model)
            print(model.describe(cfg.train.seq_len))
            print(optim.describe(model, cfg.optim))
            print(describe(cfg))
            if args.plot_schedule:
                try:
                    print(f"learning-rate schedule: {plot(cfg, args.plot_schedule)}")
                except OSError as e:
                    raise UsageError(f"--plot-schedule: cannot write {args.plot_schedule} ({e.strerror or e});"
                                     " give a PNG path in a writable directory") from None
            return EXIT_OK
        from sdd_train.checkpoint import CheckpointSaveError
        from sdd_train.train.errors import TrainingDiverged
        from sdd_train.train.launch import train
        from sdd_train.train.stop_signals import STOPS

        STOPS.install()  # from here on, SIGTERM/SIGUSR1 stop the run instead of killing the process
        try:
            run_dir = train(cfg)
        except TrainingDiverged as e:
            report(f"error: {e}", file=sys.stderr)
            return EXIT_DIVERGED
        except CheckpointSaveError as e:
            report(f"error: {e}; the previous checkpoint is intact, re-run the command to resume from it",
                   file=sys.stderr)
            return EXIT_FAILURE
        finally:
            STOPS.restore()
    except UsageError as e:
        return report_usage_error(e, report)
    report(f"run directory: {run_dir}")
    return EXIT_OK


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
