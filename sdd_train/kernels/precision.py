"""The dtypes the hand-written autograd functions compute in, autocast off inside them, and the
CPU arithmetic of their fp32 products.

Their forward and backward choose the dtype of every op themselves: fp32 statistics and scores
from bf16 inputs. Under bf16 autocast, the ops on its lower-precision list (matmuls,
``linalg.vecdot``) would silently run in bf16 instead, rounding a norm's mean square or the
attention scores to bf16 (tests/test_sdd_layer.py, tests/test_cpu_attention.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half precision; fp32 and fp64 unchanged (so float64 references stay exact)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in :func:`compute_dtype` (the same tensor when it already is)."""
    return x.to(compute_dtype(x.dtype))


def sum_of_squares(x: torch.Tensor, row: int = 8192) -> torch.Tensor:
    """sum(x^2) in ``x``'s dtype, summed in rows of ``row`` elements and then over the rows: one reduction
    over a whole large tensor accumulates rounding in proportion to its length on CPU (torch's fp32
    ``vector_norm``), which in a gradient norm makes one process and N ranks (who reduce shards) disagree
    (docs/distributed.md)."""
    flat = x.reshape(-1)
    whole = flat.numel() // row * row
    total = torch.linalg.vector_norm(flat[:whole].view(-1, row), dim=1).square().sum() if whole else flat.new_zeros(())
    if whole < flat.numel():
        total = total + flat[whole:].square().sum()
    return total


def sums_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of squares of each tensor, [len(tensors)]: CUDA's fused norm (a tree reduction, one launch for
    all of them), :func:`sum_of_squares` elsewhere."""
    if tensors[0].is_cuda:
        return torch.stack(torch._foreach_norm(tensors)).square()
    return torch.stack([sum_of_squares(t) for t in tensors])


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` runs in here: autocast's on ``x``'s device when it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# The dtype of each precision name in the config: ``train.precision`` (what matmuls compute in),
# ``parallel.param_dtype`` (what parameters are gathered and computed in; the optimizer's master weights
# and the gradient reduction stay fp32 in both, sdd_train/distributed/parallelize.py),
# ``optim.muon.ns_dtype``.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The precision policy of every forward (training, validation, statistics), one process or many:
    ``bf16`` autocasts matmuls to bf16, over fp32 parameters (``parallel.param_dtype=fp32``) or over
    bf16 copies of them (``bf16``, which also makes the embedding output, the residual stream and
    the gains bf16); norms, RoPE (its table stays fp32), softmax and the loss compute in fp32 inside
    their kernels. ``fp32`` is plain fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_off(fn: Callable) -> Callable:
    """Decorate an autograd.Function's ``forward`` / ``backward`` (``ctx`` first, then tensors) to run
    with autocast disabled on the device of its first tensor argument."""
    @functools.wraps(fn)
    def run(ctx, *args):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return fn(ctx, *args)
    return run


# The mode's setting exists from torch 2.9, and on every version that has it (2.9, 2.10, 2.11, 2.13)
# every fp32 product of a bf16 step was checked to multiply bf16 values (tests/test_precision.py).
# (2.8 also sends masked GQA attention to SDPA's math fallback, which multiplies q and k pre-scaled
# by the root of the scale: not bf16 values.)
BF16_PRODUCTS_MIN_TORCH = (2, 9)


def bf16_products_available() -> bool:
    """This torch has the mode and passed its premise (see above), and this CPU multiplies bf16
    natively (avx512_bf16 or AMX; elsewhere oneDNN would emulate bf16, slower than fp32)."""
    if torch.__version__ < BF16_PRODUCTS_MIN_TORCH:
        return False
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check is not None and check() for check in checks)


def slow_bf16_matmuls(device: torch.device) -> str | None:
    """Why bf16 matmuls are slow on ``device``, or None. PyTorch's CPU bf16 GEMMs go to oneDNN only
    where it has bf16 kernels (AVX-512 and up); elsewhere (AVX2-only x86) a reference loop multiplies
    them, several times slower than fp32 (README: a tiny-model step of 122 s), so a bf16 run trains
    far slower there."""
    if device.type != "cpu":
        return None
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if torch.backends.mkldnn.is_available() and supported is not None and supported():
        return None
    return ("this CPU has no oneDNN bf16 GEMMs (they need AVX-512): PyTorch multiplies bf16 matrices in its"
            " reference loop, several times slower than fp32; train.precision=fp32 trains faster here")


@contextlib.contextmanager
def bf16_products_of_bf16_values(device: torch.device) -> Iterator[None]:
    """On CPU, let oneDNN compute fp32 matmuls with bf16 multiplies (its bf16 fpmath mode).

    That is exact when both operands hold bf16 values, and in a bf16-autocast training step of this
    model they all do: the only fp32 products are the CPU attention's scores and score gradients,
    of bf16 q, k, v and dO upcast (checked for every block scheme in tests/test_precision.py).
    The mode also sends these products to oneDNN instead of MKL's sgemm: on the 2-core AMD dev
    machine oneDNN keeps fp32 arithmetic for them (its avx512 kernel, bitwise the same result) and is
    ~2.2x faster at the attention's shapes (760 -> 340 us for [32, 128, 64] x [32, 64, 256]); CPUs
    with AMX may multiply in bf16. Elsewhere (other devices, CPUs without native bf16, torch < 2.9)
    this changes nothing. The mode is process-wide while the context is open, so keep it around
    model code only: inside it, an fp32 matmul of values that are not bf16 may lose precision.

    Why a context entered once per step, and not a setting made once per run and restored at its
    end: the premise (every fp32 product multiplies bf16 values) holds for the model's forward and
    backward under bf16 autocast only. Between steps the same process computes in fp32 with values
    the premise does not cover: the diagnostics' statistics of fp32 parameters and activations, the
    optimizer, user callbacks, evaluation, and other fp32 runs in the same process (tests, notebooks);
    a run-wide setting would round their fp32 matmuls to bf16 multiplies without a word
    (tests/test_precision.py checks that evaluation runs without it). The trainer enters it once per
    step around all micro-batches, not per op or per micro-batch; setting the flag is one attribute
    write each way, nothing next to a step.
    """
    if device.type != "cpu" or not bf16_products_available():
        yield
        return
    matmul = torch.backends.mkldnn.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = previous
