"""benchmarks/bf16_loss.py's stand-in for bf16 GEMMs (fp32 GEMMs of bf16 operands, rounded once) gives
what PyTorch's own bf16 kernels give up to their fp32 summation order (one bf16 ulp in a few elements
of ten thousand), so the losses it measures on an AVX2-only CPU are bf16 losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import load_benchmark, small_run
from sdd_train.diagnostics.summary import read_records
from sdd_train.train.__main__ import main

@pytest.fixture(scope="module")
def bf16_loss():
    return load_benchmark("bf16_loss")


class GemmDtypes(TorchDispatchMode):
    """Entered below the stand-in, records the operand dtypes of each matrix product that reaches the
    kernels: fp32 only, where the stand-in did its job."""

    def __init__(self, gemms):
        super().__init__()
        self.gemms, self.seen = gemms, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.gemms:
            self.seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
        return func(*args, **(kwargs or {}))


def test_each_gemm_is_as_accurate_as_the_bf16_kernel(bf16_loss):
    """Shapes and layouts of the small run's forward and backward (transposed operands as autograd passes
    them): against the float64 product, the stand-in is as accurate as PyTorch's bf16 kernel, element
    for element the correctly rounded result as often, and the two disagree in under one element in a
    thousand (fp32 sums in another order, rounded once)."""
    torch.manual_seed(0)
    a, b, bias = (torch.randn(*s).bfloat16() for s in ((256, 64), (512, 64), (512,)))
    g = torch.randn(256, 512).bfloat16()
    a3, b3, c3 = (torch.randn(*s).bfloat16() for s in ((8, 128, 64), (8, 64, 16), (8, 128, 16)))
    cases = [(torch.mm, (a, b.t()), {}), (torch.mm, (g.t(), a), {}),
             (torch.addmm, (bias, a, b.t()), {"beta": 0.5, "alpha": 2.0}),
             (torch.bmm, (a3, b3), {}), (torch.baddbmm, (c3, a3, b3), {})]
    for op, args, kwargs in cases:
        native = op(*args, **kwargs)
        with GemmDtypes(bf16_loss.GEMMS) as reached, bf16_loss.Bf16GemmInFp32():
            stood_in = op(*args, **kwargs)
        assert reached.seen == [{torch.float32}], op.__name__
        exact = op(*(x.double() for x in args), **kwargs)
        assert stood_in.dtype == torch.bfloat16, op.__name__
        error, native_error = ((x.double() - exact).abs().max().item() for x in (stood_in, native))
        rounded, native_rounded = ((x == exact.bfloat16()).double().mean().item() for x in (stood_in, native))
        assert error <= 1.01 * native_error and rounded >= native_rounded - 1e-3 > 0.99, op.__name__
        assert (stood_in != native).double().mean() < 1e-3, op.__name__


def test_a_bf16_training_run_under_the_stand_in_is_the_native_one(bf16_loss, data_cache, tmp_path):
    """Three steps of the small run with bf16 parameters (SDD block: SDD layers, fused SwiGLU), natively
    and through the stand-in: the same first loss to the bit (the forward's few one-ulp differences
    average out), then losses and gradient norms within 1e-3."""
    overrides = ["train.max_steps=3", "train.precision=bf16", "parallel.param_dtype=bf16", "model.block=sdd"]
    assert main(small_run(tmp_path / "native", data_cache, *overrides)) == 0
    args = small_run(tmp_path / "stand_in", data_cache, *overrides)
    with GemmDtypes(bf16_loss.GEMMS) as reached:
        assert bf16_loss.train_run(Path(args[0]), args[1:]) == 0
    assert len(reached.seen) > 100 and all(dtypes == {torch.float32} for dtypes in reached.seen)
    native, stood_in = ([(r["loss"], r["grad_norm"]) for r in read_records(tmp_path / d / "metrics.jsonl") if "loss" in r]
                        for d in ("native", "stand_in"))
    assert len(native) == 3 and stood_in[0][0] == native[0][0]
    for (loss, norm), (native_loss, native_norm) in zip(stood_in, native):
        assert loss == pytest.approx(native_loss, rel=1e-4) and norm == pytest.approx(native_norm, rel=1e-3)
