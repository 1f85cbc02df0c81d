"""``sdd-ckpt list RUN_DIR`` and ``sdd-ckpt verify RUN_DIR|CHECKPOINT``: a run's checkpoints, and
whether their files still match the checksums recorded when they were written.

``list`` prints every checkpoint directory with its step, tokens seen, size and status from the
file sizes alone (fast); ``verify`` reads every file and compares checksums. Exit code 0 when every
checkpoint looked at is intact, 2 when one is not (or the path is not a run or a checkpoint).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from sdd_train.checkpoint.manifest import MANIFEST, read_manifest, size_problem
from sdd_train.checkpoint.storage import CORRUPT, META, PARTIAL, checkpoint_dir, latest, step_of, verify_checkpoint
from sdd_train.exit_codes import EXIT_CONFIG, EXIT_OK, CheckpointUnusable, report_usage_error


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def status_by_size(path: Path) -> str:
    """A checkpoint's state from its name, its meta.json and its files' sizes against the manifest."""
    if path.name.endswith(PARTIAL):
        return "incomplete (being written, or left by a crash or a failed save)"
    if CORRUPT in path.name:
        return "set aside (failed verification or loading on resume)"
    if not (path / META).is_file():
        return "incomplete (no meta.json)"
    try:
        files = read_manifest(path)
    except ValueError as e:
        return f"CORRUPT ({e})"
    if files is None:
        return "complete, unverifiable (no manifest, or xxhash is not installed)"
    wrong = [name for name, entry in files.items() if size_problem(path, name, entry)]
    if not wrong:
        return "complete"
    return f"CORRUPT ({len(wrong)} file(s) missing, unreadable or of another size: {', '.join(wrong[:3])})"


def _checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = (p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+(\..*)?", p.name))
    return sorted(found, key=lambda p: (step_of(p), p.name))


def list_run(run_dir: Path) -> int:
    checkpoints = _checkpoints(run_dir)
    if not checkpoints:
        return report_usage_error(CheckpointUnusable(f"{run_dir}: no checkpoints in {checkpoint_dir(run_dir)}"))
    newest = latest(run_dir)
    print(f"{'checkpoint':<22} {'step':>8} {'tokens':>16} {'size':>11}  status")
    for path in checkpoints:
        try:
            status, size = status_by_size(path), _human(_size(path))
            meta = json.loads((path / META).read_text()) if (path / META).is_file() else {}
        except OSError as e:  # a permission or I/O error: this row says so, the others are still listed
            status, size, meta = f"UNREADABLE ({e.strerror or e})", "-", {}
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            meta, status = {}, status if CORRUPT in path.name else f"CORRUPT ({META} unreadable)"
        step = str(meta.get("step", "-"))
        tokens = f"{meta['tokens_seen']:,}" if isinstance(meta.get("tokens_seen"), int) else "-"
        mark = " (latest)" if newest is not None and path == newest else ""
        print(f"{path.name:<22} {step:>8} {tokens:>16} {size:>11}  {status}{mark}")
    return EXIT_OK


def verify_paths(paths: list[Path]) -> int:
    bad = 0
    for path in paths:
        problems = verify_checkpoint(path)
        if problems is None:
            print(f"{path}: unverifiable (no {MANIFEST}, or xxhash is not installed)")
        elif problems:
            bad += 1
            print(f"{path}: CORRUPT")
            for problem in problems:
                print(f"  {problem}")
        else:
            print(f"{path}: ok")
    return EXIT_CONFIG if bad else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdd-ckpt", description="List a run's checkpoints, or verify their files.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="step, tokens, size and status of every checkpoint of a run").add_argument("run_dir")
    verify = sub.add_parser("verify", help="check every file of a run's complete checkpoints (or of one) against"
                                           " its recorded checksum")
    verify.add_argument("path", help="a run directory or one checkpoint directory")
    args = parser.parse_args(argv)
    if args.command == "list":
        return list_run(Path(args.run_dir))
    path = Path(args.path)
    if (path / META).is_file() or (path / MANIFEST).is_file():
        return verify_paths([path])
    complete = [p for p in _checkpoints(path) if (p / META).is_file() and PARTIAL not in p.name
                and CORRUPT not in p.name]
    if not complete:
        return report_usage_error(CheckpointUnusable(f"{path}: neither a checkpoint nor a run directory with complete"
                                                     " checkpoints"))
    return verify_paths(complete)


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
