"""The SDD linear layer y = alpha * rms(V x) (SPEC section 1)."""

import pytest
import torch

from reference import rms
from sdd_train.kernels import norm
from sdd_train.model.layers import SDDLinear


def make(in_f=24, out_f=40, groups=1, seed=0):
    torch.manual_seed(seed)
    layer = SDDLinear(in_f, out_f, eps=1e-5, norm_groups=groups).double()
    with torch.no_grad():
        layer.alpha.copy_(torch.randn(out_f, dtype=torch.float64))
    return layer, torch.randn(5, 7, in_f, dtype=torch.float64)


def test_matches_float64_reference():
    layer, x = make()
    expected = layer.alpha * (x @ layer.weight.T) / torch.sqrt(((x @ layer.weight.T) ** 2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_output_rms_per_token_equals_abs_alpha():
    layer, x = make()
    for value in (0.25, -3.0):
        with torch.no_grad():
            layer.alpha.fill_(value)
        y = layer(x)
        token_rms = y.pow(2).mean(-1).sqrt()
        torch.testing.assert_close(token_rms, torch.full_like(token_rms, abs(value)), rtol=1e-4, atol=0)
    # with a per-feature alpha, y / alpha has unit RMS per token
    layer, x = make(seed=1)
    unit = (layer(x) / layer.alpha).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(unit, torch.ones_like(unit), rtol=1e-4, atol=0)


def test_invariant_to_scale_of_v():
    layer, x = make()
    y = layer(x)
    with torch.no_grad():
        layer.weight.mul_(37.0)
    # exact up to eps: eps / mean(z^2) ~ 1e-5 here
    torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-6)
    layer.eps = 1e-30
    y = layer(x)
    with torch.no_grad():
        layer.weight.mul_(1e-3)
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)


def test_per_branch_groups_normalise_each_half():
    layer, x = make(out_f=40, groups=2)
    z = x @ layer.weight.T
    expected = torch.cat([rms(z[..., :20], layer.alpha[:20], 1e-5), rms(z[..., 20:], layer.alpha[20:], 1e-5)], -1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    one = rms(z, layer.alpha, 1e-5)  # the fused variant differs
    assert not torch.allclose(layer(x), one)


def test_bf16_input_normalises_in_fp32():
    layer, x = make()
    layer = layer.float()
    y32 = layer(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x.float())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=2e-2, atol=2e-2)


def test_autocast_does_not_lower_the_norm_precision():
    """Blocks call the norm under bf16 autocast: output and gradients must be the fp32-statistics
    ones (autocast would compute the mean square with a bf16 ``vecdot``)."""
    torch.manual_seed(0)
    x = (torch.randn(64, 256) * 3).bfloat16().requires_grad_()
    weight = (torch.rand(256) + 0.5).requires_grad_()
    dy = torch.randn(64, 256).bfloat16()
    y = norm.rms_norm_torch(x, weight, 1e-5)
    grads = torch.autograd.grad(y, (x, weight), dy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac = norm.rms_norm_torch(x, weight, 1e-5)
        grads_ac = torch.autograd.grad(y_ac, (x, weight), dy)
    assert torch.equal(y_ac, y)
    for g_ac, g in zip(grads_ac, grads):
        assert torch.equal(g_ac, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 2])
def test_pytorch_norm_in_cpu_row_blocks_matches_float64(monkeypatch, dtype, groups):
    """The PyTorch-path norm (hand-written backward, CPU rows in cache-sized blocks): output, input
    and gain gradients against float64 autograd, over several blocks with a ragged last one and a
    strided input (a slice of a wider projection, as q and k are)."""
    monkeypatch.setattr(norm, "NORM_BLOCK_ELEMENTS", 3 * 40)  # 3 rows of width 40 per block
    torch.manual_seed(0)
    wide = (torch.randn(2, 7, 64) * 3).to(dtype)
    x = wide[..., 8:48].detach().requires_grad_()  # 14 rows of 40 = 4 full blocks + 2 rows
    weight = (torch.rand(40) + 0.5).requires_grad_()
    y = norm.rms_norm_torch(x, weight, 1e-5, groups)
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    halves = x64.unflatten(-1, (groups, -1))
    ref = rms(halves, w64.view(groups, -1), 1e-5).flatten(-2)
    ref.backward(dy.double())
    rtol = 2**-8 if dtype == torch.bfloat16 else 1e-5  # one rounding of the fp32 result to bf16
    assert y.dtype == dtype
    for got, want in ((y, ref), (x.grad, x64.grad), (weight.grad, w64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-6 * want.abs().max().item())


def test_norm_compiles_with_symbolic_sizes():
    """A compiled norm whose input shape changes gets symbolic sizes (dynamo's automatic dynamic
    shapes): torch 2.11's dynamo failed on size arithmetic inside the norm's autograd function. aot_eager:
    the failure was dynamo's, and AOT autograd traces the same symbolic graphs without generating code."""
    weight = torch.rand(32) + 0.5
    compiled = torch.compile(lambda x, w: norm.rms_norm_torch(x, w, 1e-5), fullgraph=True, backend="aot_eager")
    for shape in [(2, 16, 32), (3, 16, 32), (3, 24, 32)]:
        x = torch.randn(shape, requires_grad=True)
        w = weight.clone().requires_grad_()
        compiled(x, w).square().sum().backward()
        x64, w64 = x.detach().double().requires_grad_(), weight.double().requires_grad_()
        norm.rms_norm_torch(x64, w64, 1e-5).square().sum().backward()
        torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w.grad, w64.grad.float(), rtol=1e-4, atol=1e-4)
