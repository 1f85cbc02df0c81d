"""Checkpoint integrity: the size and checksum of every file, recorded in ``manifest.json`` before a
checkpoint is marked complete, and checked before it is loaded.

The checksum is xxHash's XXH3-128 (``xxhash``, a dependency), which hashes at memory speed (its
cost next to a save is measured in docs/reliability.md); where ``xxhash`` cannot be imported,
BLAKE2b-128 (standard library, slower). The manifest names its algorithm, and verification uses it.
The files of a checkpoint are split among the ranks that save it (and that load it), so each hashes
its share, several files at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

try:
    import xxhash
except ImportError:  # pragma: no cover - an environment without the dependency
    xxhash = None

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 256 << 10  # bytes read at a time
HASHES: dict[str, Callable[[], Any]] = {"blake2b": lambda: hashlib.blake2b(digest_size=16)}
if xxhash is not None:
    HASHES["xxh3_128"] = xxhash.xxh3_128
ALGORITHM = "xxh3_128" if xxhash is not None else "blake2b"  # what new manifests use


def file_checksum(path: Path, algorithm: str = ALGORITHM) -> str:
    """The checksum of a file's bytes, read in chunks into one reused buffer small enough to stay in
    the CPU's cache while it is hashed. (Not from a memory map: a read error there is a SIGBUS that
    kills the process, where a read is an OSError.)"""
    digest = HASHES[algorithm]()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def checkpoint_files(directory: Path) -> list[str]:
    """Every file of a checkpoint directory but the manifest, as sorted relative paths."""
    directory = Path(directory)
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))


def _checksums(directory: Path, files: list[str], algorithms: list[str]) -> list[str | OSError]:
    """The files' checksums, several at a time (xxhash and hashlib release the GIL while hashing); the
    error in place of the checksum of a file that could not be read."""
    def checksum(name: str, algorithm: str) -> str | OSError:
        try:
            return file_checksum(Path(directory) / name, algorithm)
        except OSError as e:
            return e

    workers = max(1, min(len(files), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(checksum, files, algorithms))


def describe_files(directory: Path, files: list[str]) -> dict[str, dict[str, Any]]:
    """``{file: {"size": bytes, ALGORITHM: hex}}`` of the given files of ``directory``."""
    described = {}
    for name, checksum in zip(files, _checksums(directory, files, [ALGORITHM] * len(files))):
        if isinstance(checksum, OSError):
            raise checksum
        described[name] = {"size": (Path(directory) / name).stat().st_size, ALGORITHM: checksum}
    return described


def manifest_text(files: dict[str, dict[str, Any]]) -> str:
    """The content of ``manifest.json`` for the described files (written atomically by the caller:
    a manifest is whole or absent)."""
    return json.dumps({"format": FORMAT, "algorithm": ALGORITHM, "files": files}, indent=1, sort_keys=True)


def read_manifest(directory: Path) -> dict[str, dict[str, Any]] | None:
    """The recorded files, or None when the checkpoint cannot be verified here: it has no manifest
    (written before checksums were recorded), or its algorithm is not installed (xxhash). An
    unreadable manifest is a problem of the checkpoint: ValueError."""
    path = Path(directory) / MANIFEST
    try:
        if not path.is_file():
            return None
        manifest = json.loads(path.read_text())
        algorithm = manifest["algorithm"]
        if algorithm == "xxh3_128" and xxhash is None:
            return None
        if algorithm not in HASHES:
            raise ValueError(f"unknown checksum algorithm {algorithm!r}")
        files = dict(manifest["files"])
        if not all(isinstance(e, dict) and "size" in e and algorithm in e for e in files.values()):
            raise ValueError("an entry without size or checksum")
        return files
    except (OSError, KeyError, TypeError, AttributeError, ValueError) as e:  # ValueError: JSON's and ours
        raise ValueError(f"{path}: unreadable manifest ({e})") from None


def size_problem(directory: Path, name: str, entry: dict[str, Any]) -> str | None:
    """What is wrong with a file's presence or size against its manifest entry (None: nothing)."""
    path = Path(directory) / name
    try:
        size = path.stat().st_size if path.is_file() else None
    except OSError as e:
        return f"{name}: unreadable ({e.strerror or e})"
    if size is None:
        return f"{name}: missing"
    return f"{name}: {size} bytes, the manifest says {entry['size']}" if size != entry["size"] else None


def problems_of(directory: Path, files: dict[str, dict[str, Any]], check: list[str] | None = None) -> list[str]:
    """What is wrong with the ``check`` files (default: all) of ``directory`` against the manifest:
    missing, a different size, a different checksum. [] when they are intact."""
    found, hash_these = [], []
    for name in files if check is None else check:
        problem = size_problem(directory, name, files[name])
        if problem is None:
            hash_these.append(name)
        else:
            found.append(problem)
    algorithms = [_algorithm_of(files[name]) for name in hash_these]
    for name, algorithm, got in zip(hash_these, algorithms, _checksums(directory, hash_these, algorithms)):
        if isinstance(got, OSError):
            found.append(f"{name}: unreadable ({got.strerror or got})")
        elif got != files[name][algorithm]:
            found.append(f"{name}: checksum differs from the manifest")
    return found


def _algorithm_of(entry: dict[str, Any]) -> str:
    return next(name for name in entry if name in HASHES)
