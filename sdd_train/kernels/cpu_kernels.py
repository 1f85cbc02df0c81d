"""Build and load the CPU C kernels (``cpu_kernels.c``): the model's norms in eager mode and the
SDD feed-forward's norm + SwiGLU (ops in :mod:`cpu_rms_norm` and :mod:`cpu_sdd_swiglu`).

Why C: each of these is a few memory passes in PyTorch (upcast, statistics, scale; the backward's
row sums, input gradient and the gain's column sum, the last reading everything again), and
inductor, compiled, still makes the SwiGLU-width backward three passes over tensors that do not fit
in cache. The kernels work row by row while the row is in L1 (docs/benchmarks.md has the numbers).

Built on first use with the system C compiler (``$CC``, which may carry arguments, else ``cc``;
inductor needs one on CPU too) with ``-O3 -march=native -fopenmp`` into
``$SDD_TRAIN_CACHE/kernels`` (keyed by source, compiler command, flags and CPU), loaded with ctypes.
Without a compiler, for dtypes other than fp32/bf16, or with ``SDD_TRAIN_NORM_KERNEL=torch``
(:func:`sdd_train.kernels.settings.norm_kernel`, read once), :func:`kernel_for` returns None and the
callers compute the same in PyTorch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import torch

from sdd_train.kernels.settings import cpu_values, norm_kernel

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _cache_dir() -> Path:
    return Path(os.environ.get("SDD_TRAIN_CACHE", Path.home() / ".cache" / "sdd_train")) / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: a library built on one CPU model may not run on another."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None if no C compiler could build them (logged once)."""
    if not SOURCE.exists():  # e.g. the model code inlined into a Hugging Face export
        log.info("%s is not next to this module: CPU norms run in PyTorch", SOURCE.name)
        return None
    found = shutil.which("cc") or shutil.which("gcc")
    compiler = shlex.split(os.environ.get("CC", "")) or ([found] if found else [])
    if not compiler:
        log.warning("no C compiler found ($CC, cc, gcc): CPU norms run in PyTorch")
        return None
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(compiler).encode(), " ".join(FLAGS).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    path = _cache_dir() / f"cpu_kernels-{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")  # ranks may build at once
            subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", str(partial)], check=True,
                           capture_output=True, text=True, timeout=300)
            os.replace(partial, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        log.warning("could not build %s with %s (%s): CPU norms run in PyTorch",
                    SOURCE.name, " ".join(compiler), detail.strip()[-500:])
        return None
    ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.rms_norm_forward.argtypes = [ptr, ptr, f32, ptr, ptr, i64, i64, i64, i32, i32]
    lib.rms_norm_backward.argtypes = [ptr] * 6 + [i64, i64, i64, i32, i32]
    lib.sdd_swiglu_forward.argtypes = [ptr, ptr, f32, ptr, ptr, i64, i64, i64, i32, i32]
    lib.sdd_swiglu_backward.argtypes = [ptr] * 6 + [i64, i64, i64, i32, ptr, i32]
    return lib


def kernel_for(x: torch.Tensor) -> ctypes.CDLL | None:
    """The library where its kernels take ``x`` (a CPU fp32/bf16 tensor, not forced off), else None."""
    if not cpu_values(x) or x.dtype not in _KERNEL_DTYPES or norm_kernel() == "torch":
        return None
    return library()
