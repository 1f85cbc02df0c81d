"""The CPU C kernels (sdd_train.kernels.cpu_kernels): RMSNorm x gain in eager mode and the SDD
feed-forward's norm + SwiGLU, each one kernel per direction."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import small_model_cfg, threads
from sdd_train.kernels import cpu_kernels, cpu_rms_norm, norm, rms_norm, rms_norm_torch
from sdd_train.kernels.cpu_sdd_swiglu import sdd_swiglu
from sdd_train.kernels.settings import NORM_KERNEL_ENV, set_norm_kernel
from sdd_train.model.feed_forward import SwiGLU

EPS = 1e-5
# one bf16 rounding of the result (2^-9 relative, as a norm over many elements ~1.7e-3 here)
TOLERANCE = {torch.bfloat16: 4e-3, torch.float32: 1e-6}


@pytest.fixture(autouse=True)
def norm_kernel_setting():
    """Every test starts and ends with the setting unread: the next norm reads the environment."""
    set_norm_kernel(None)
    yield
    set_norm_kernel(None)


@pytest.fixture
def kernel():
    """The C path: fails (instead of silently testing the fallback) where the kernel cannot be built."""
    set_norm_kernel("auto")
    assert cpu_kernels.library() is not None, "the C kernel did not build (see the log)"


def reference(x: torch.Tensor, weight: torch.Tensor, dh: torch.Tensor, groups: int):
    """h, dx, dweight in float64 by autograd through the textbook ops."""
    xd, wd = x.double().requires_grad_(), weight.double().requires_grad_()
    parts = xd.unflatten(-1, (groups, -1))
    y = (parts * torch.rsqrt(parts.pow(2).mean(-1, keepdim=True) + EPS)).flatten(-2) * wd
    up, gate = y.chunk(2, dim=-1)
    h = F.silu(gate) * up
    h.backward(dh.double())
    return h.detach(), xd.grad, wd.grad


def run(x: torch.Tensor, weight: torch.Tensor, dh: torch.Tensor, groups: int):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    h = sdd_swiglu(x, weight, EPS, groups)
    h.backward(dh)
    return h.detach(), x.grad, weight.grad


def inputs(dtype: torch.dtype, shape=(3, 37, 2 * 344), scale: float = 1.0,
           x_rms: float | torch.Tensor = 3.0):
    torch.manual_seed(0)
    x = (torch.randn(shape) * x_rms).to(dtype)
    weight = (torch.rand(shape[-1]) + 0.5) * scale
    dh = torch.randn(*shape[:-1], shape[-1] // 2).to(dtype)
    return x, weight, dh


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def assert_close_fp32(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 results of two summation orders: close relative to the tensor's scale (sums that cancel
    to ~0 keep only absolute accuracy)."""
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6 * want.abs().max().item())


# ---------------------------------------------------------------------------- SDD norm + SwiGLU


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("groups", [1, 2])
def test_swiglu_matches_float64(path, dtype, groups):
    """Output, input and gain gradients of the C kernel and of its PyTorch fallback against float64."""
    if path == "kernel":
        assert cpu_kernels.library() is not None
    set_norm_kernel("auto" if path == "kernel" else "torch")
    x, weight, dh = inputs(dtype)
    got, want = run(x, weight, dh, groups), reference(x, weight, dh, groups)
    assert got[0].dtype == got[1].dtype == dtype and got[2].dtype == weight.dtype
    for g, w in zip(got, want):
        assert relative_error(g, w) < TOLERANCE[dtype]


def test_swiglu_kernel_equals_pytorch_path_and_ignores_thread_count(kernel):
    """fp32: the kernel and the fallback agree to rounding; the kernel's per-row results (h, dx) are
    bitwise the same with one thread or two (rows are split between threads, never a row)."""
    x, weight, dh = inputs(torch.float32)
    with threads(2):
        ours = run(x, weight, dh, 1)
    set_norm_kernel("torch")
    fallback = run(x, weight, dh, 1)
    for a, b in zip(ours, fallback):
        assert_close_fp32(a, b)
    set_norm_kernel("auto")
    with threads(1):
        single = run(x, weight, dh, 1)
    assert torch.equal(single[0], ours[0]) and torch.equal(single[1], ours[1])
    assert_close_fp32(single[2], ours[2])


def test_swiglu_saturated_gates_and_nan_rows(kernel):
    """Gates far beyond exp's range (gain x 60: |gate| up to ~200) stay exact where the sigmoid
    saturates, and a NaN in a row makes that row's output and gradient NaN instead of a number."""
    x, weight, dh = inputs(torch.float32, scale=60.0)
    got, want = run(x, weight, dh, 1), reference(x, weight, dh, 1)
    assert (want[0].abs().max() > 150) and all(relative_error(g, w) < 1e-6 for g, w in zip(got, want))
    x[1, 5, 7] = float("nan")
    h, dx, _ = run(x, weight, dh, 1)
    assert h[1, 5].isnan().all() and dx[1, 5].isnan().all()
    assert not h[1, 4].isnan().any() and not dx[0].isnan().any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_swiglu_custom_ops_pass_opcheck(kernel, dtype):
    """Schemas, fake (meta) functions and the autograd registration, as torch.compile relies on them
    (bf16: the kernel; fp64: the PyTorch path, whose statistics stay fp64)."""
    x, weight, _ = inputs(dtype, shape=(40, 2 * 96))
    weight = weight.to(dtype)
    torch.library.opcheck(torch.ops.sdd_train.sdd_swiglu.default, (x, weight.clone().requires_grad_(), EPS, 2))
    h, rstd = torch.ops.sdd_train.sdd_swiglu(x, weight, EPS, 2)
    dh = torch.randn_like(h)
    torch.library.opcheck(torch.ops.sdd_train.sdd_swiglu_backward.default, (dh, x, weight, rstd))


@pytest.mark.parametrize("compile", [False, True])
def test_sdd_feed_forward_matches_unfused_composition(kernel, compile):
    """The model's SDD SwiGLU on CPU (the kernel; compiled as one graph) equals ff_proj's norm then
    silu(gate) * up in fp32: output and the gradients of input, V and alpha."""
    cfg = small_model_cfg(block="sdd")
    torch.manual_seed(0)
    ffn = SwiGLU(cfg, sdd=True)
    with torch.no_grad():
        ffn.ff_proj.alpha.uniform_(0.5, 2.0)
    x = torch.randn(2, 9, cfg.d_model, requires_grad=True)
    grad = torch.randn(2, 9, cfg.d_model)  # (not a norm of the output: ff_out's SDD norm makes that ~constant)

    def unfused(x: torch.Tensor) -> torch.Tensor:
        proj = ffn.ff_proj
        up, gate = rms_norm(F.linear(x, proj.weight), proj.alpha, proj.eps).chunk(2, dim=-1)
        return ffn.ff_out(F.silu(gate) * up)

    forward = torch.compile(ffn, fullgraph=True) if compile else ffn
    results = []
    for fn in (forward, unfused):
        ffn.zero_grad()
        x.grad = None
        out = fn(x)
        out = out[0] if isinstance(out, tuple) else out  # the SwiGLU's (output, None: nothing to report)
        out.backward(grad)
        results.append([out.detach(), x.grad, ffn.ff_proj.weight.grad, ffn.ff_proj.alpha.grad])
    for got, want in zip(*results):
        assert_close_fp32(got, want)


# ---------------------------------------------------------------------------- RMSNorm x gain


def norm_reference(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, groups: int, eps: float = EPS):
    xd, wd = x.double().requires_grad_(), weight.double().requires_grad_()
    parts = xd.unflatten(-1, (groups, -1))
    y = (parts * torch.rsqrt(parts.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * wd
    y.backward(dy.double())
    return y.detach(), xd.grad, wd.grad


def norm_run(norm, x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, groups: int):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y = norm(x, weight, EPS, groups)
    y.backward(dy)
    return y.detach(), x.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,groups", [((3, 37, 96), 1), ((5, 7, 4, 64), 1), ((41, 96), 4)])
def test_norm_matches_float64_and_pytorch_path(kernel, dtype, shape, groups):
    """The eager CPU norm against float64 (block norms; per-head QK-norm rows of 64; the per-branch
    grouped SDD norm), and against the PyTorch path; fp32 outputs and rows bitwise the same with one
    thread or two."""
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).to(dtype)
    weight, dy = torch.rand(shape[-1]) + 0.5, torch.randn(shape).to(dtype)
    with threads(2):
        got = norm_run(cpu_rms_norm.cpu_rms_norm, x, weight, dy, groups)
    for g, w in zip(got, norm_reference(x, weight, dy, groups)):
        assert relative_error(g, w) < TOLERANCE[dtype]
    assert got[0].dtype == got[1].dtype == dtype and got[2].dtype == torch.float32
    if dtype == torch.float32:
        for a, b in zip(got, norm_run(rms_norm_torch, x, weight, dy, groups)):
            assert_close_fp32(a, b)
        with threads(1):
            single = norm_run(cpu_rms_norm.cpu_rms_norm, x, weight, dy, groups)
        assert torch.equal(single[0], got[0]) and torch.equal(single[1], got[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_eps_counts_where_the_mean_square_is_near_it(kernel, dtype):
    """Rows of RMS 1e-2 and 1e-3 (mean square 10x and 0.1x eps): the C kernels and the PyTorch paths
    add eps as the formula does, in the norm and the SDD SwiGLU, outputs and both gradients."""
    x, weight, dh = inputs(dtype, shape=(2, 5, 2 * 64), x_rms=torch.tensor([1e-2, 1e-3]).view(2, 1, 1))
    dy = torch.randn(x.shape).to(dtype)
    for groups in (1, 2):
        want = norm_reference(x, weight, dy, groups)
        # without eps the result would be 5% (RMS 1e-2) to 3x (RMS 1e-3) off
        assert relative_error(norm_reference(x, weight, dy, groups, eps=0.0)[0], want[0]) > 10 * TOLERANCE[dtype]
        for kernel in (cpu_rms_norm.cpu_rms_norm, rms_norm_torch):
            for g, w in zip(norm_run(kernel, x, weight, dy, groups), want):
                assert relative_error(g, w) < TOLERANCE[dtype], (kernel.__name__, groups)
    for path in ("auto", "torch"):
        set_norm_kernel(path)
        for groups in (1, 2):
            for g, w in zip(run(x, weight, dh, groups), reference(x, weight, dh, groups)):
                assert relative_error(g, w) < TOLERANCE[dtype], (path, groups)


def test_norm_backward_runs_the_kernel_of_its_forward(kernel):
    """Forcing the PyTorch path between a forward and its backward does not strand the backward."""
    x, weight, dy = torch.randn(5, 64, requires_grad=True), torch.rand(64) + 0.5, torch.randn(5, 64)
    y = cpu_rms_norm.cpu_rms_norm(x, weight, EPS)
    set_norm_kernel("torch")
    y.backward(dy)
    assert_close_fp32(x.grad, norm_reference(x.detach(), weight, dy, 1)[1].float())


def test_norm_dispatch(kernel, monkeypatch):
    """rms_norm takes the C kernel on CPU in eager mode for fp32/bf16, the PyTorch path for float64,
    under torch.compile (one fused graph, no break) and with SDD_TRAIN_NORM_KERNEL=torch."""
    calls = []
    monkeypatch.setattr(cpu_rms_norm, "cpu_rms_norm", lambda *a: calls.append(a) or rms_norm_torch(*a))
    monkeypatch.setattr(norm, "cpu_rms_norm", cpu_rms_norm.cpu_rms_norm)
    x, weight = torch.randn(6, 32), torch.ones(32)
    norm.rms_norm(x, weight, EPS)
    norm.rms_norm(x.bfloat16(), weight, EPS)
    assert len(calls) == 2
    norm.rms_norm(x.double(), weight.double(), EPS)
    torch.compile(norm.rms_norm, fullgraph=True)(x, weight, EPS)
    set_norm_kernel("torch")
    norm.rms_norm(x, weight, EPS)
    assert len(calls) == 2


def test_builds_into_cache_and_falls_back_without_compiler(monkeypatch, tmp_path, caplog):
    """A fresh cache gets a library keyed by source, compiler command, flags and CPU ($CC may carry
    arguments); with no usable compiler the ops log why once and compute the same in PyTorch."""
    monkeypatch.setenv("SDD_TRAIN_CACHE", str(tmp_path))
    set_norm_kernel("auto")
    monkeypatch.delenv("CC", raising=False)
    cpu_kernels.library.cache_clear()
    try:
        assert cpu_kernels.library() is not None
        cpu_kernels.library.cache_clear()
        monkeypatch.setenv("CC", f"{shutil.which('cc') or shutil.which('gcc')} -Wall")
        assert cpu_kernels.library() is not None
        built_files = sorted(p.name for p in (tmp_path / "kernels").iterdir())
        assert len(built_files) == 2 and all(n.startswith("cpu_kernels-") and n.endswith(".so") for n in built_files)
        x, weight, dh = inputs(torch.float32)
        built = run(x, weight, dh, 2)

        cpu_kernels.library.cache_clear()
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("SDD_TRAIN_CACHE", str(tmp_path / "empty"))
        with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
            fallback = run(x, weight, dh, 2)
            run(x, weight, dh, 2)
        assert cpu_kernels.library() is None and not cpu_rms_norm.use_cpu_norm(x)
        assert len([r for r in caplog.records if "run in PyTorch" in r.getMessage()]) == 1
        for a, b in zip(built, fallback):
            assert_close_fp32(a, b)
    finally:
        cpu_kernels.library.cache_clear()


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="even width"):
        sdd_swiglu(torch.randn(4, 7), torch.ones(7), EPS)
    with pytest.raises(ValueError, match="1 or 2 groups"):
        sdd_swiglu(torch.randn(4, 8), torch.ones(8), EPS, groups=4)
    with pytest.raises(ValueError, match="divisible by 3"):
        cpu_rms_norm.cpu_rms_norm(torch.randn(4, 8), torch.ones(8), EPS, groups=3)
    with pytest.raises(RuntimeError, match="no CPU kernel for a torch.float64"):
        cpu_rms_norm.cpu_rms_norm(torch.randn(4, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), EPS)


def test_the_norm_kernel_setting_is_read_once(monkeypatch, caplog):
    """$SDD_TRAIN_NORM_KERNEL is read at the first norm, not on every call: changing the environment
    afterwards changes nothing until set_norm_kernel(None) (the reset) or set_norm_kernel(value)."""
    assert cpu_kernels.library() is not None
    x = torch.randn(4, 32)
    monkeypatch.setenv(NORM_KERNEL_ENV, "torch")
    assert cpu_kernels.kernel_for(x) is None  # read now: the PyTorch path
    monkeypatch.setenv(NORM_KERNEL_ENV, "auto")
    assert cpu_kernels.kernel_for(x) is None  # still: the environment is not read again
    set_norm_kernel(None)
    assert cpu_kernels.kernel_for(x) is not None  # read again after the reset
    monkeypatch.setenv(NORM_KERNEL_ENV, "torch")
    assert cpu_kernels.kernel_for(x) is not None
    set_norm_kernel("torch")
    assert cpu_kernels.kernel_for(x) is None
    with pytest.raises(ValueError, match="not one of auto, torch"):
        set_norm_kernel("triton")
    monkeypatch.setenv(NORM_KERNEL_ENV, "tritn")
    set_norm_kernel(None)
    with caplog.at_level(logging.WARNING):
        assert cpu_kernels.kernel_for(x) is not None  # an unknown value: a warning, then auto
    assert "SDD_TRAIN_NORM_KERNEL=tritn is not one of auto, torch" in caplog.text
