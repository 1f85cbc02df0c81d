"""The fused RMSNorm Triton kernels: numerics against float64, dispatch, and a real sm_90 build.

Triton cannot launch kernels on a CPU, so the ``interpreted`` tests run the kernels through Triton's
interpreter (the same kernel code, executed with NumPy). Interpreter mode must be chosen before
triton is imported, so ``test_kernels_in_triton_interpreter`` runs them in a child pytest with
TRITON_INTERPRET=1. ``test_kernels_compile_for_hopper`` builds them for sm_90 with Triton's own
ptxas, which checks what the interpreter does not (types, block shapes, register allocation).
The ``gpu`` tests launch them for real on CUDA.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import small_model_cfg
from sdd_train.kernels import norm
from sdd_train.kernels import triton_rms_norm as kernels
from sdd_train.kernels.settings import set_norm_kernel
from sdd_train.model import Transformer

pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason="needs triton (pip install triton)")
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETER, reason="runs in the TRITON_INTERPRET=1 child process")
ROOT = Path(__file__).resolve().parents[1]
# One rounding of an fp32 result to bf16: 2^-8 relative when rounded to nearest (GPU); Triton's
# interpreter truncates fp32 -> bf16, which can cost up to 2^-7.
BF16_RTOL = 2**-7 if INTERPRETER else 2**-8

# (shape, groups): a block norm, the per-branch SDD norm of an up+gate projection, QK-norm per head
CASES = [((3, 5, 96), 1), ((4, 7, 100), 2), ((2, 3, 4, 16), 1)]


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int) -> torch.Tensor:
    xf = x.double().unflatten(-1, (groups, -1))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight.double()


def check_against_float64(x: torch.Tensor, weight: torch.Tensor, groups: int, rtol: float) -> None:
    """Output, input gradient and gain gradient of the kernel within ``rtol`` of float64 (plus a
    floor of 1e-6 of the largest value, for entries near zero)."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    y = kernels.fused_rms_norm(x, weight, 1e-5, groups)
    dy = torch.randn(y.shape, dtype=y.dtype, device=y.device)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = reference(x64, w64, 1e-5, groups)
    ref.backward(dy.double())
    assert y.dtype == x.dtype and y.shape == x.shape
    for got, want in ((y, ref), (x.grad, x64.grad), (weight.grad, w64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-6 * want.abs().max().item())


@pytest.mark.skipif(INTERPRETER or torch.cuda.is_available(), reason="the child process / CUDA runs them directly")
def test_kernels_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpreted"],
                           env=env, capture_output=True, text=True, timeout=600)
    if child.returncode and "only 0-dimensional arrays can be converted to Python scalars" in child.stdout:
        import numpy
        import triton

        # Triton 3.2 and 3.6's interpreters turn kernel scalars into 1-element arrays: numpy 2.2 accepts them, 2.4 not
        pytest.skip(f"Triton {triton.__version__}'s interpreter does not run with numpy {numpy.__version__}")
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and "skipped" not in child.stdout.splitlines()[-1], child.stdout[-1000:]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,groups", CASES)
def test_interpreted_fused_norm_matches_float64(dtype, shape, groups):
    torch.manual_seed(0)
    x = (3 * torch.randn(shape)).to(dtype)
    weight = torch.rand(shape[-1]) + 0.5
    check_against_float64(x, weight, groups, rtol=1e-5 if dtype == torch.float32 else BF16_RTOL)


@interpreted
def test_interpreted_fused_norm_reads_strided_rows():
    """q and k are column slices of the fused projection: the kernel reads them in place."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 64 + 2 * 32)
    q = qkv[..., :64]
    assert not q.is_contiguous()
    check_against_float64(q, torch.rand(64) + 0.5, 1, rtol=1e-5)


@interpreted
@pytest.mark.parametrize("block", ["sdd", "pre"])
def test_interpreted_model_with_fused_norms_equals_pytorch_path(monkeypatch, block):
    """Every norm of a model (block norms, QK-norm per head or full, SDD norms incl. per-branch)
    through the kernel gives the PyTorch path's logits and gradients."""
    torch.manual_seed(0)
    model = Transformer(small_model_cfg(block, n_layers=2, sdd_ffn_norm="per_branch"))
    tokens = torch.randint(0, 97, (2, 8))

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        logits = model(tokens)
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_logits, plain_grads = run()
    calls = []
    monkeypatch.setattr(norm, "use_fused_norm", lambda x: calls.append(x.shape) or True)
    fused_logits, fused_grads = run()
    assert len(calls) >= 2 * 4 + 1  # at least the block norms, QK-norms and the final norm ran fused
    torch.testing.assert_close(fused_logits, plain_logits, rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item(), msg=name)


@interpreted
def test_interpreted_kernel_benchmark_smoke(tmp_path):
    """benchmarks/kernels.py runs end to end (tiny shapes; its numbers mean nothing here)."""
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--json", str(tmp_path / "k.json")]) == 0
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert [r["groups"] for r in rows] == [1, 2] and all(r["triton_fwd_bwd_s"] > 0 for r in rows)


def test_dispatch_uses_pytorch_off_cuda_and_when_forced(monkeypatch):
    x = torch.randn(4, 8)
    assert not kernels.use_fused_norm(x)  # CPU tensor
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert kernels.use_fused_norm(x)
    assert not kernels.use_fused_norm(x.double())  # float64 references stay on the PyTorch path
    set_norm_kernel("torch")
    try:
        assert not kernels.use_fused_norm(x)
    finally:
        set_norm_kernel(None)


def _signature(kernel, dtype: str, groups: int, block_n: int) -> tuple[dict[str, str], dict[str, int]]:
    """Triton signature of one of our kernels: data pointers in ``dtype``, fp32 statistics and gain."""
    pointers, fp32 = {"X", "W", "Y", "RSTD", "DY", "DX", "DW"}, {"W", "RSTD", "DW"}
    constexprs = {"G": groups, "BLOCK_G": groups, "BLOCK_N": block_n}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*fp32" if name in fp32 else f"*{dtype}"
        else:
            signature[name] = "fp32" if name == "eps" else "i32"
    return signature, constexprs


@pytest.mark.skipif(INTERPRETER, reason="the interpreter replaces the compiler")
@pytest.mark.parametrize("groups,block_n", [(1, 16), (1, 2048), (2, 8192)])
def test_kernels_compile_for_hopper(groups, block_n):
    """Both kernels build to sm_90 machine code (as on an H100/H200) at the launch shapes we use."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import triton

    _, _, num_warps = kernels._launch_shape(block_n, groups)
    for kernel in kernels._kernels():
        signature, constexprs = _signature(kernel, "bf16", groups, block_n)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps})
        assert compiled.asm["cubin"] and "sm_90" in compiled.asm["ptx"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,groups", [((4, 4096, 2048), 1), ((2, 4096, 16384), 2), ((4, 4096, 16, 128), 1)])
def test_fused_norm_on_gpu_matches_float64(dtype, shape, groups):
    torch.manual_seed(0)
    x = (3 * torch.randn(shape, device="cuda")).to(dtype)
    weight = torch.rand(shape[-1], device="cuda") + 0.5
    assert kernels.use_fused_norm(x)
    check_against_float64(x, weight, groups, rtol=1e-5 if dtype == torch.float32 else BF16_RTOL)
