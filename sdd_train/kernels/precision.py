"""The dtypes the hand-written autograd functions compute in, and autocast off inside them.

Their forward and backward choose the dtype of every op themselves: fp32 statistics and scores
from bf16 inputs. Under bf16 autocast, the ops on its lower-precision list (matmuls,
``linalg.vecdot``) would silently run in bf16 instead, rounding a norm's mean square or the
attention scores to bf16 (tests/test_sdd_layer.py, tests/test_cpu_attention.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half precision; fp32 and fp64 unchanged (so float64 references stay exact)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def autocast_off(fn: Callable) -> Callable:
    """Decorate an autograd.Function's ``forward`` / ``backward`` (``ctx`` first, then tensors) to run
    with autocast disabled on the device of its first tensor argument."""
    @functools.wraps(fn)
    def run(ctx, *args):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return fn(ctx, *args)
    return run
