"""Atomic, verified, reshardable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of ``RUN/checkpoints/``::

    step_0000050/            a complete checkpoint: DCP shards + .metadata, rng/, meta.json,
                             manifest.json (every file's size and checksum)
    step_0000100.partial/    being written (or left by a crash or a failed save); never loaded
    step_0000080.corrupt/    failed verification or loading on resume; kept for inspection
    latest                   name of the newest complete checkpoint; moved last

Every rank writes its shards into ``step_N.partial``; rank 0 writes ``meta.json`` (step, world
size, trainer and data state); the ranks checksum the files between them and rank 0 writes
``manifest.json``, renames the directory and only then moves ``latest``. A kill at any moment, or
a save that fails (a full disk, a quota, permissions), leaves the previous checkpoint the one that
loads: every step of a save that can fail is agreed on by all ranks, which then raise together.
DCP stores global shapes, so a checkpoint written by N ranks loads on M ranks (or one process).
"""

from __future__ import annotations

import inspect
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sdd_train.checkpoint.manifest import (MANIFEST, checkpoint_files, describe_files, manifest_text, problems_of,
                                           read_manifest)
from sdd_train.exit_codes import CheckpointUnusable
from sdd_train.distributed.world import World, all_gather_object

# DCP warns on every single-process save/load, even when asked for one explicitly.
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")

PARTIAL = ".partial"
CORRUPT = ".corrupt"
META = "meta.json"
_COMPLETE_NAME = re.compile(r"step_\d+")


class CheckpointError(RuntimeError):
    """A checkpoint that fails verification or cannot be loaded (raised on every rank alike)."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint whose model tensors are not this model's (names or shapes): the run's
    config changed, the checkpoint is not damaged."""


class CheckpointSaveError(RuntimeError):
    """A save that failed (raised on every rank alike); the previous checkpoint is untouched."""


def _single_process(fn, single: bool) -> dict[str, bool]:
    """``no_dist=single`` for DCP functions that take it (torch >= 2.7); older ones decide it
    themselves from whether a process group exists (the same answer, but for a consolidated read
    inside a distributed run)."""
    return {"no_dist": single} if "no_dist" in inspect.signature(fn).parameters else {}


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(Path(path).name.removeprefix("step_").split(".")[0])


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
    return sorted((p for p in root.glob("step_*") if is_complete_checkpoint(p)), key=step_of)


def is_complete_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint directory whose save finished (``step_N`` with its meta.json)."""
    path = Path(path)
    return path.is_dir() and bool(_COMPLETE_NAME.fullmatch(path.name)) and (path / META).is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    return _complete(checkpoint_dir(run_dir))


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint. The ``latest`` marker file is for people and other tools: a
    kill between a checkpoint's rename and the marker's move leaves it naming the one before."""
    done = _complete(checkpoint_dir(run_dir))
    return done[-1] if done else None


def resolve_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The checkpoint of ``step`` (default: the latest complete one) of a run directory."""
    if step is None:
        ckpt = latest(run_dir)
        if ckpt is None:
            raise CheckpointUnusable(f"{run_dir}: no complete checkpoint in {checkpoint_dir(run_dir)}")
        return ckpt
    ckpt = checkpoint_dir(run_dir) / f"step_{step:07d}"
    if not (ckpt / "meta.json").is_file():
        raise CheckpointUnusable(f"--step: no complete checkpoint {ckpt}")
    return ckpt


def verify_checkpoint(path: Path) -> list[str] | None:
    """What is wrong with a checkpoint's files, in this process alone: [] when intact, None when it
    cannot be verified here (:func:`sdd_train.checkpoint.manifest.read_manifest`)."""
    try:
        files = read_manifest(path)
    except ValueError as e:
        return [str(e)]
    return None if files is None else problems_of(path, files)


def first_of(problems: list[str]) -> str:
    """The first of a non-empty list of problems, and how many more there are (for one-line messages)."""
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def verified(path: Path) -> Path:
    """``path``, or a CheckpointUnusable naming what is corrupt (for the offline tools: one line, exit 2)."""
    problems = verify_checkpoint(path)
    if problems:
        raise CheckpointUnusable(f"{path}: corrupt checkpoint: {first_of(problems)}; `sdd-ckpt verify {path}` lists every"
                          " problem; use another checkpoint (--step N, `sdd-ckpt list RUN_DIR`)")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())


def _model_tensors(path: Path) -> dict[str, TensorStorageMetadata]:
    """The checkpoint's model tensors by name (global size and dtype), from DCP's metadata."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {key.removeprefix("model."): md for key, md in metadata.items()
            if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}


def _tensor_differences(path: Path, model_sd: dict[str, Any]) -> list[str]:
    """How the checkpoint's model tensors (names, global shapes) differ from ``model_sd``'s (plain or
    sharded tensors)."""
    saved = {key: tuple(md.size) for key, md in _model_tensors(path).items()}
    here = {key: tuple(value.shape) for key, value in model_sd.items() if isinstance(value, torch.Tensor)}
    return ([f"{k}: in the checkpoint, not in this model" for k in sorted(saved.keys() - here.keys())]
            + [f"{k}: in this model, not in the checkpoint" for k in sorted(here.keys() - saved.keys())]
            + [f"{k}: shape {list(saved[k])} in the checkpoint, {list(here[k])} here"
               for k in sorted(saved.keys() & here.keys()) if saved[k] != here[k]])


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


def _reason(e: BaseException) -> str:
    """An error's message on one line. DCP's errors carry each failing rank's traceback: there the
    last line, the error the traceback ends in, says what went wrong."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[-1] if "Traceback" in str(e) and lines else " ".join(lines)
    return text if len(text) <= 300 else text[:297] + "..."


class Checkpointer:
    """Saves and restores model + optimizer (sharded), RNG states (per rank) and trainer state.

    With ``async_save`` the shards are staged in memory and written by a background thread; the
    checkpoint is finalised (meta.json, manifest, rename, ``latest``) at the next save or at
    :meth:`wait`.
    """

    def __init__(self, run_dir: Path, world: World, keep: int, permanent_every: int = 0, async_save: bool = False):
        self.root = checkpoint_dir(run_dir)
        self.world = world
        self.keep = keep
        self.permanent_every = permanent_every
        self.async_save = async_save
        self._pending: tuple[Future, int, str] | None = None  # an async save: its future, step, meta.json
        # Background writes must not interleave with the training collectives on the default group.
        self._pg = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def _agreed(self, action: Callable[[], Any], error: type[Exception], what: str, share: bool = True) -> Any:
        """Run ``action`` on every rank; every rank's result (``share``; else this rank's own, which
        need not be picklable), or ``error`` raised on every rank when it failed on any (so the
        ranks' collectives stay matched)."""
        result, failure = None, None
        try:
            result = action()
        except (Exception, CheckpointException) as e:  # a disk, DCP (a BaseException) or pickle error, reported
            failure = f"rank {self.world.rank}: {type(e).__name__}: {_reason(e)}"
        outcomes = all_gather_object((result if share else None, failure))
        failures = [f for _, f in outcomes if f is not None]
        if failures:
            raise error(f"{what}: {failures[0]}" + (f" (and {len(failures) - 1} other rank(s))" if len(failures) > 1
                                                    else ""))
        return [r for r, _ in outcomes] if share else result

    # ------------------------------------------------------------------ save

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             meta: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step``; returns its final path (complete once this returns, unless
        async). Raises :class:`CheckpointSaveError` on every rank when any part of it fails."""
        self.wait()
        final = self.root / f"step_{step:07d}"
        partial = final.with_name(final.name + PARTIAL)
        what = f"checkpoint of step {step} not saved"
        try:
            self._agreed(lambda: self._prepare(partial), CheckpointSaveError, what)
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optimizer": optim_sd}
            rng = partial / "rng" / f"rank_{self.world.rank}.pt"
            self._agreed(lambda: torch.save(_rng_state(), rng), CheckpointSaveError, what)
            # Serialised now: callback state must be the state of this step, not of when an async save ends.
            meta = self._agreed(lambda: json.dumps({**meta, "step": step, "world_size": self.world.world_size},
                                                   indent=1), CheckpointSaveError, what, share=False)
            if self.async_save:
                future = self._agreed(lambda: dcp.async_save(
                    state, checkpoint_id=str(partial), process_group=self._pg,
                    **_single_process(dcp.async_save, not dist.is_initialized())), CheckpointSaveError, what,
                    share=False)
                self._pending = (future, step, meta)
                return final
            self._agreed(lambda: dcp.save(state, checkpoint_id=str(partial),
                                          **_single_process(dcp.save, not dist.is_initialized())),
                         CheckpointSaveError, what)
            self._finalise(step, meta)
        except CheckpointSaveError:
            self._discard(partial)
            raise
        return final

    def _prepare(self, partial: Path) -> None:
        if self.world.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            (partial / "rng").mkdir(parents=True)

    def wait(self) -> None:
        """Finish a pending background save (a no-op when none is pending)."""
        if self._pending is None:
            return
        future, step, meta = self._pending
        self._pending = None
        try:
            self._agreed(future.result, CheckpointSaveError, f"checkpoint of step {step} not saved", share=False)
            self._finalise(step, meta)
        except CheckpointSaveError:
            self._discard(self.root / f"step_{step:07d}{PARTIAL}")
            raise

    def _finalise(self, step: int, meta: str) -> None:
        """meta.json, then every file's checksum (the ranks share the files), the manifest, the rename,
        ``latest``: each step agreed on, so a failure anywhere leaves only a ``.partial`` directory."""
        final = self.root / f"step_{step:07d}"
        partial = final.with_name(final.name + PARTIAL)
        what = f"checkpoint of step {step} not saved"
        self._agreed(lambda: self.world.is_main and write_atomic(partial / META, meta), CheckpointSaveError, what)
        # Every file any rank sees, each hashed by one of the ranks that see it: on a shared filesystem a
        # rank's directory listing may lag behind another rank's writes, never behind its own.
        listings = [set(files) for files in self._agreed(lambda: checkpoint_files(partial), CheckpointSaveError, what)]
        files = sorted(set().union(*listings))
        owners = [[rank for rank, seen in enumerate(listings) if name in seen] for name in files]
        mine = [name for i, (name, ranks) in enumerate(zip(files, owners)) if ranks[i % len(ranks)] == self.world.rank]
        shares = self._agreed(lambda: describe_files(partial, mine), CheckpointSaveError, what)
        described = {name: entry for share in shares for name, entry in share.items()}

        def publish() -> None:
            if not self.world.is_main:
                return
            write_atomic(partial / MANIFEST, manifest_text(described))
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            write_atomic(self.root / "latest", final.name)
            self._prune(protect=final)

        self._agreed(publish, CheckpointSaveError, what)

    def _discard(self, partial: Path) -> None:
        """Remove what a failed save wrote (frees the space a full disk needs)."""
        if self.world.is_main:
            shutil.rmtree(partial, ignore_errors=True)

    def _prune(self, protect: Path) -> None:
        for p in self.root.glob(f"step_*{PARTIAL}"):  # no save is pending while a checkpoint is finalised
            shutil.rmtree(p, ignore_errors=True)
        rolling = [p for p in _complete(self.root)
                   if not (self.permanent_every and step_of(p) % self.permanent_every == 0)]
        for p in rolling[:-self.keep]:
            if p != protect:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ verify and load

    def verify(self, path: Path) -> list[str] | None:
        """:func:`verify_checkpoint` with the files shared among the ranks; the same answer on every rank
        (each reads the manifest, and they agree on what it says before they share the hashing)."""
        try:
            files, unreadable = read_manifest(path), None
        except ValueError as e:
            files, unreadable = None, str(e)
        views = all_gather_object((unreadable, files is None))
        errors = [error for error, _ in views if error is not None]
        if errors:
            return errors[:1]
        if any(unverifiable for _, unverifiable in views):  # e.g. xxhash missing on some node
            return None
        mine = sorted(files)[self.world.rank::self.world.world_size]
        return [p for share in all_gather_object(problems_of(path, files, mine)) for p in share]

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model and optimizer (resharding to this world as needed); return meta.json. Raises
        :class:`CheckpointError` on every rank when the checkpoint cannot be read.

        RNG states are restored only when the world size matches the one that saved them.
        """
        what = f"{path}: cannot be loaded"
        meta = self._agreed(lambda: read_meta(path), CheckpointError, what, share=False)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        differences = self._agreed(lambda: _tensor_differences(path, model_sd), CheckpointError, what)[0]
        if differences:  # DCP would load a model that lacks some of the checkpoint's tensors without a word
            raise CheckpointMismatch(f"{path}: its model is not this run's: {first_of(differences)}")
        state = {"model": model_sd, "optimizer": optim_sd}
        self._agreed(lambda: dcp.load(state, checkpoint_id=str(path),
                                      **_single_process(dcp.load, not dist.is_initialized())), CheckpointError, what)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if meta["world_size"] == self.world.world_size:  # decided alike on every rank: each loads its own
            rng = Path(path) / "rng" / f"rank_{self.world.rank}.pt"
            _set_rng_state(self._agreed(lambda: torch.load(rng, weights_only=False), CheckpointError, what,
                                        share=False))
        return meta

    def quarantine(self, path: Path) -> Path:
        """Move a checkpoint that failed out of the way (``step_N.corrupt``), kept for inspection."""
        target = path.with_name(path.name + CORRUPT)
        n = 1
        while target.exists():
            target, n = path.with_name(f"{path.name}{CORRUPT}{n}"), n + 1
        self._agreed(lambda: self.world.is_main and path.rename(target), CheckpointUnusable,
                     f"{path} failed verification or loading and cannot be set aside (make the run directory"
                     " writable, or move it away yourself)", share=False)
        return target


def read_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The full (consolidated) model tensors of a checkpoint, in one process, on CPU; a checkpoint
    that cannot be read is a CheckpointUnusable naming it."""
    try:
        state = {"model": {key: torch.empty(md.size, dtype=md.properties.dtype)
                           for key, md in _model_tensors(path).items()}}
        dcp.load(state, checkpoint_id=str(path), **_single_process(dcp.load, True))
    except (Exception, CheckpointException) as e:
        raise CheckpointUnusable(f"{path}: the checkpoint cannot be read ({type(e).__name__}: {_reason(e)}); use another"
                          " checkpoint (--step N, `sdd-ckpt list RUN_DIR`)") from None
    return state["model"]
