"""fp32 products in bf16 training: what they multiply, and the CPU bf16 arithmetic that relies on it.

On CPU the trainer runs a bf16 step's forward and backward inside
:func:`bf16_products_of_bf16_values`, which computes every fp32 matmul with bf16 multiplies. That is
exact only because every fp32 product of such a step multiplies values that bf16 holds exactly;
the first test checks that claim for every block scheme, the MoE, document masks and both losses.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ALL_BLOCKS, small_model_cfg, small_run
from sdd_train.config import MoEConfig
from sdd_train.kernels.precision import (BF16_PRODUCTS_MIN_TORCH, bf16_products_available,
                                         bf16_products_of_bf16_values)
from sdd_train.model import Transformer
from sdd_train.train import train_module
from sdd_train.train.__main__ import main

aten = torch.ops.aten
PRODUCTS = {aten.mm, aten.bmm, aten.baddbmm, aten.addmm, aten.addbmm, aten.dot, aten.mv, aten.addmv}
if hasattr(aten, "_grouped_mm"):
    PRODUCTS.add(aten._grouped_mm)

# Where the trainer can turn the mode on, document masks (SDPA) are checked too; older SDPA on CPU
# sends masked GQA attention to its math fallback, which multiplies q and k pre-scaled (not bf16)
MODE_USED = torch.__version__ >= BF16_PRODUCTS_MIN_TORCH
needs_bf16_products = pytest.mark.skipif(not bf16_products_available(),
                                         reason=f"torch < {BF16_PRODUCTS_MIN_TORCH} or a CPU without avx512_bf16 / AMX")


def holds_bf16_values(t: torch.Tensor) -> bool:
    return bool(torch.equal(t, t.bfloat16().float()))


class Fp32Products(TorchDispatchMode):
    """Records, for every matmul-family op on fp32 tensors, whether all its tensor operands hold bf16 values."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in PRODUCTS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if any(t.dtype == torch.float32 for t in tensors):
                self.seen.append((str(func), all(holds_bf16_values(t.float()) for t in tensors)))
        return func(*args, **(kwargs or {}))


CASES = {**{block: {} for block in ALL_BLOCKS},
         "sdd+moe": {"ffn": "moe", "moe": MoEConfig(n_experts=4, top_k=2, expert_hidden=16)},
         "pre+moe+loop": {"ffn": "moe", "moe": MoEConfig(n_experts=4, top_k=2, expert_hidden=16, grouped_mm="loop")}}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("loss", ["chunked", "plain"])
def test_fp32_products_of_a_bf16_step_multiply_bf16_values(case, loss):
    """Forward and backward of a bf16-autocast step (with and without document masks, where the mode
    exists): every fp32 matmul's operands are bf16 values (the CPU attention's upcast q, k, v, dO),
    so computing them in bf16 arithmetic with fp32 accumulation is exact. A new fp32 product of fp32
    data fails this."""
    torch.manual_seed(0)
    block = case.split("+")[0]
    model = Transformer(small_model_cfg(block, **CASES[case]))
    tokens = torch.randint(0, 97, (2, 17))
    doc_ids = torch.tensor([[0] * 9 + [1] * 8, [0] * 17])
    fp32_products = 0
    for docs in (None, doc_ids) if MODE_USED else (None,):
        with Fp32Products() as products:
            with torch.autocast("cpu", torch.bfloat16):
                if loss == "chunked":
                    total = model(tokens[:, :-1], docs if docs is None else docs[:, :-1], targets=tokens[:, 1:],
                                  z_loss=1e-4, loss_chunk=8).loss
                else:  # the chunked path's loss holds the MoE's load balancing; here it is added by hand
                    states, aux = model.run_blocks(tokens[:, :-1], docs if docs is None else docs[:, :-1])
                    logits = model.head(states[-1])
                    total = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
                    if aux:
                        total = total + torch.stack([a.lb_loss for a in aux]).mean()
            total.backward()
        assert all(exact for _, exact in products.seen), [op for op, exact in products.seen if not exact]
        fp32_products += len(products.seen)
    assert fp32_products > 0  # the unmasked pass runs the CPU attention: not a vacuous check


@needs_bf16_products
def test_bf16_products_of_bf16_values_are_exact():
    """Inside the context oneDNN may multiply in bf16: fp32 products of bf16 values (the attention's
    shapes) still equal the float64 ones to fp32 accumulation error. The previous setting comes back."""
    torch.manual_seed(0)
    q, k = torch.randn(8, 128, 64).bfloat16().float(), (torch.randn(8, 256, 64) * 3).bfloat16().float()
    before = torch.backends.mkldnn.matmul.fp32_precision
    with bf16_products_of_bf16_values(torch.device("cpu")):
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        scores = torch.baddbmm(torch.zeros(8, 128, 256), q, k.transpose(1, 2), alpha=0.125)
        plain = torch.bmm(q, k.transpose(1, 2))
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    ref = q.double() @ k.double().transpose(1, 2)
    assert (plain.double() - ref).abs().max() < 1e-4 * ref.abs().max()
    assert (scores.double() - 0.125 * ref).abs().max() < 1e-4 * ref.abs().max()


def test_the_context_changes_nothing_off_cpu_or_without_native_bf16(monkeypatch):
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    before = getattr(matmul, "fp32_precision", None)
    with bf16_products_of_bf16_values(torch.device("meta")):
        assert getattr(matmul, "fp32_precision", None) == before
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not bf16_products_available()
    with bf16_products_of_bf16_values(torch.device("cpu")):
        assert getattr(matmul, "fp32_precision", None) == before


@needs_bf16_products
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_trainer_uses_bf16_products_in_bf16_steps_only(tmp_path, data_cache, precision, monkeypatch):
    """The setting is on during a bf16 step's forward and backward, off in fp32 training and
    outside the step (evaluation, diagnostics)."""
    seen: dict[str, set] = {"step": set(), "eval": set()}
    real_autocast = train_module.autocast  # entered around every micro-batch's forward of a step

    def autocast(*args, **kwargs):
        seen["step"].add(torch.backends.mkldnn.matmul.fp32_precision)
        return real_autocast(*args, **kwargs)

    real_evaluate = train_module.evaluate_sets  # what the train module's evaluation calls

    def evaluate(*args, **kwargs):
        seen["eval"].add(torch.backends.mkldnn.matmul.fp32_precision)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "autocast", autocast)
    monkeypatch.setattr(train_module, "evaluate_sets", evaluate)
    args = small_run(tmp_path / "run", data_cache, "train.max_steps=2", "train.eval_interval=2",
                     f"train.precision={precision}")
    outside = torch.backends.mkldnn.matmul.fp32_precision
    assert main(args) == 0
    assert seen["step"] == ({"bf16"} if precision == "bf16" else {outside})
    assert seen["eval"] and "bf16" not in seen["eval"]


@pytest.mark.parametrize("native", [True, False])
def test_a_cpu_without_onednn_bf16_gemms_is_named_slow_for_bf16(native, monkeypatch):
    """Where oneDNN has no bf16 GEMMs (AVX2-only x86), PyTorch multiplies bf16 in a reference loop:
    a bf16 run says so at start-up (a warning naming train.precision=fp32); elsewhere it says nothing."""
    from sdd_train.kernels import slow_bf16_matmuls
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    problem = slow_bf16_matmuls(torch.device("cpu"))
    assert (problem is None) == native
    assert native or "train.precision=fp32" in problem
    assert slow_bf16_matmuls(torch.device("cuda")) is None
