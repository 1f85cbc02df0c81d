"""Atomic, reshardable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of ``RUN/checkpoints/``::

    step_0000050/            a complete checkpoint: DCP shards + .metadata, rng/, meta.json
    step_0000100.partial/    being written (or left by a crash); never loaded, removed later
    latest                   name of the newest complete checkpoint; moved last

Every rank writes its shards into ``step_N.partial``; after a barrier rank 0 writes
``meta.json`` (step, world size, trainer and data state), renames the directory and only then
moves ``latest``. A kill at any moment therefore leaves the previous checkpoint loadable. DCP
stores global shapes, so a checkpoint written by N ranks loads on M ranks (or one process).
"""

from __future__ import annotations

import inspect
import json
import os
import random
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sdd_train.config import ConfigError
from sdd_train.distributed.world import World, barrier

# DCP warns on every single-process save/load, even when asked for one explicitly.
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")

PARTIAL = ".partial"
META = "meta.json"


def _single_process(fn, single: bool) -> dict[str, bool]:
    """``no_dist=single`` for DCP functions that take it (torch >= 2.7); older ones decide it
    themselves from whether a process group exists (the same answer, but for a consolidated read
    inside a distributed run)."""
    return {"no_dist": single} if "no_dist" in inspect.signature(fn).parameters else {}


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(Path(path).name.removeprefix("step_").removesuffix(PARTIAL))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _complete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL)
                  and (p / META).is_file())


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, following ``latest`` when it names a complete one."""
    root = checkpoint_dir(run_dir)
    marker = root / "latest"
    if marker.is_file():
        path = root / marker.read_text().strip()
        if (path / META).is_file():
            return path
    done = _complete(root)
    return done[-1] if done else None


def resolve_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The checkpoint of ``step`` (default: the latest complete one) of a run directory."""
    if step is None:
        ckpt = latest(run_dir)
        if ckpt is None:
            raise ConfigError(f"{run_dir}: no complete checkpoint in {checkpoint_dir(run_dir)}")
        return ckpt
    ckpt = checkpoint_dir(run_dir) / f"step_{step:07d}"
    if not (ckpt / "meta.json").is_file():
        raise ConfigError(f"--step: no complete checkpoint {ckpt}")
    return ckpt


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and restores model + optimizer (sharded), RNG states (per rank) and trainer state.

    With ``async_save`` the shards are staged in memory and written by a background thread; the
    checkpoint is finalised (meta.json, rename, ``latest``) at the next save or at :meth:`wait`.
    """

    def __init__(self, run_dir: Path, world: World, keep: int, permanent_every: int = 0, async_save: bool = False):
        self.root = checkpoint_dir(run_dir)
        self.world = world
        self.keep = keep
        self.permanent_every = permanent_every
        self.async_save = async_save
        self._pending: tuple[Future, Path, dict[str, Any]] | None = None
        # Background writes must not interleave with the training collectives on the default group.
        self._pg = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    # ------------------------------------------------------------------ save

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             meta: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step``; returns its final path (complete once this returns, unless async)."""
        self.wait()
        final = self.root / f"step_{step:07d}"
        partial = final.with_name(final.name + PARTIAL)
        if self.world.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            (partial / "rng").mkdir(parents=True)
        barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        torch.save(_rng_state(), partial / "rng" / f"rank_{self.world.rank}.pt")
        meta = {**meta, "step": step, "world_size": self.world.world_size}
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(partial), process_group=self._pg,
                                    **_single_process(dcp.async_save, not dist.is_initialized()))
            self._pending = (future, final, meta)
        else:
            dcp.save(state, checkpoint_id=str(partial), **_single_process(dcp.save, not dist.is_initialized()))
            self._finalise(final, meta)
        return final

    def wait(self) -> None:
        """Finish a pending background save (a no-op when none is pending)."""
        if self._pending is None:
            return
        future, final, meta = self._pending
        self._pending = None
        future.result()
        self._finalise(final, meta)

    def _finalise(self, final: Path, meta: dict[str, Any]) -> None:
        barrier()  # every rank's shards are on disk
        if self.world.is_main:
            partial = final.with_name(final.name + PARTIAL)
            write_atomic(partial / META, json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            write_atomic(self.root / "latest", final.name)
            self._prune(protect=final)
        barrier()

    def _prune(self, protect: Path) -> None:
        for p in self.root.glob(f"step_*{PARTIAL}"):  # no save is pending while a checkpoint is finalised
            shutil.rmtree(p, ignore_errors=True)
        rolling = [p for p in _complete(self.root)
                   if not (self.permanent_every and step_of(p) % self.permanent_every == 0)]
        for p in rolling[:-self.keep]:
            if p != protect:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model and optimizer (resharding to this world as needed); return meta.json.

        RNG states are restored only when the world size matches the one that saved them.
        """
        meta = read_meta(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path), **_single_process(dcp.load, not dist.is_initialized()))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        rng = Path(path) / "rng" / f"rank_{self.world.rank}.pt"
        if meta["world_size"] == self.world.world_size and rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        return meta


def read_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The full (consolidated) model tensors of a checkpoint, in one process, on CPU."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    template = {
        key.removeprefix("model."): torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    state = {"model": template}
    dcp.load(state, checkpoint_id=str(path), **_single_process(dcp.load, True))
    return state["model"]
