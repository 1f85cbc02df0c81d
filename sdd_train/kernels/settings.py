"""Process-wide kernel settings: each is read from the environment once, on first use, then kept;
code (a test, a benchmark) changes it through its setter, never by editing ``os.environ`` mid-run.

``SDD_TRAIN_NORM_KERNEL`` (:func:`norm_kernel`): ``auto`` (default) runs the fused norm kernels where
they run (Triton on CUDA, C on CPU, and the C SDD SwiGLU); ``torch`` forces the PyTorch path
everywhere, for A/B comparisons and debugging.
"""

from __future__ import annotations

import logging
import os

import torch
from torch._subclasses.fake_tensor import FakeTensor

log = logging.getLogger(__name__)

NORM_KERNEL_ENV = "SDD_TRAIN_NORM_KERNEL"
NORM_KERNELS = ("auto", "torch")

_norm_kernel: str | None = None  # None: not read yet


def norm_kernel() -> str:
    """The norm kernel setting: ``$SDD_TRAIN_NORM_KERNEL`` as it was at the first call (or what
    :func:`set_norm_kernel` set since). Kernel selection calls this on every norm, so it must not
    read the environment each time."""
    global _norm_kernel
    if _norm_kernel is None:
        value = os.environ.get(NORM_KERNEL_ENV) or "auto"
        if value not in NORM_KERNELS:
            log.warning("%s=%s is not one of %s: using auto", NORM_KERNEL_ENV, value, ", ".join(NORM_KERNELS))
            value = "auto"
        _norm_kernel = value
    return _norm_kernel


def set_norm_kernel(value: str | None) -> None:
    """Set the norm kernel for this process from now on (``auto`` or ``torch``); ``None`` forgets the
    setting, so the next norm reads ``$SDD_TRAIN_NORM_KERNEL`` again."""
    global _norm_kernel
    if value is not None and value not in NORM_KERNELS:
        raise ValueError(f"norm kernel {value!r} is not one of {', '.join(NORM_KERNELS)}")
    _norm_kernel = value


_cpu_paths = True


def set_cpu_paths(enabled: bool) -> None:
    """Whether CPU tensors take the CPU's own paths (the C kernels, the CPU attention, the
    cache-sized blocks of the norm and the loss), on by default; off, a CPU run takes the paths a GPU
    run takes in PyTorch ops and holds the memory they hold, which is what the memory estimate is
    checked against."""
    global _cpu_paths
    _cpu_paths = enabled


def cpu_values(x: torch.Tensor) -> bool:
    """``x`` is a CPU tensor that holds values (or stands for one while torch.compile traces), and the
    CPU paths are on: where those paths run. Fake tensors outside compilation (the memory estimate's:
    shapes without storage) take the PyTorch paths, which save for backward what the GPU kernels save,
    and which never read a data pointer."""
    if not (_cpu_paths and x.device.type == "cpu"):
        return False
    return torch.compiler.is_compiling() or not isinstance(x, FakeTensor)
