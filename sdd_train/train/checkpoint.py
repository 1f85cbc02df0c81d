"""Atomic single-process checkpoints: ``RUN/checkpoints/step_NNNNNNN/`` plus a ``latest`` marker.

A checkpoint is written under a ``.partial`` name and renamed when complete; ``latest`` moves
last. A crash or kill at any moment therefore leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

PARTIAL = ".partial"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def save(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Save ``state`` (a dict of state dicts and plain values) as the checkpoint of ``step``."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:07d}"
    partial = final.with_name(final.name + PARTIAL)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    torch.save(state, partial / "state.pt")
    _write_atomic(partial / "meta.json", json.dumps({"step": step}))
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    _write_atomic(root / "latest", final.name)
    _prune(root, keep, protect=final)
    return final


def _complete(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL)
                  and (p / "meta.json").is_file())


def _prune(root: Path, keep: int, protect: Path) -> None:
    for p in root.glob(f"step_*{PARTIAL}"):
        shutil.rmtree(p, ignore_errors=True)
    for p in _complete(root)[:-keep]:
        if p != protect:
            shutil.rmtree(p, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, following ``latest`` when it is valid."""
    root = checkpoint_dir(run_dir)
    marker = root / "latest"
    if marker.is_file():
        path = root / marker.read_text().strip()
        if (path / "meta.json").is_file():
            return path
    done = _complete(root) if root.is_dir() else []
    return done[-1] if done else None


def load(path: Path) -> dict[str, Any]:
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
