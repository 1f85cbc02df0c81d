"""Host memory for CPU training: make glibc's malloc keep freed memory for the next step.

PyTorch allocates CPU tensors with plain ``malloc``. glibc serves blocks above its mmap threshold
(128 KiB, adapting up to 32 MiB) with fresh ``mmap`` pages and unmaps them on ``free``, and trims
the heap top back to the kernel, so every step's large activations and gradients are page-faulted
in again, 4 KiB at a time, zero-filled by the kernel. Eager elementwise ops then run at page-fault
speed: on the 2-core dev machine filling a fresh 128 MiB tensor took 45 ms instead of 5 ms, and a
tiny-config eager ``sdd`` step 2.08 s instead of 1.27 s (docs/benchmarks.md). Serving all blocks
from the heap and never trimming it turns that into reuse, as the CUDA caching allocator does on
GPU. The price: the process keeps its peak heap, which a training loop reaches every step anyway.

``SDD_TRAIN_CPU_MALLOC=system`` leaves malloc alone (e.g. to compare, or under jemalloc/tcmalloc).
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "SDD_TRAIN_CPU_MALLOC"

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_SETTINGS = (
    (_M_MMAP_MAX, 0),                   # no block gets its own mmap: all come from the reusable heap
    (_M_TRIM_THRESHOLD, 2**31 - 1),     # never give the heap top back (mallopt takes an int)
    (_M_TOP_PAD, 64 << 20),             # grow the heap in steps of 64 MiB, not one page at a time
)

_applied = False


def keep_freed_memory() -> bool:
    """Tune glibc malloc for reuse (once per process); True if this process now runs with it.

    A no-op returning False off glibc (macOS, musl) or with ``SDD_TRAIN_CPU_MALLOC=system``.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV, "").lower() == "system" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in _SETTINGS)
    return _applied
