"""End-to-end CPU training: every scheme learns, accumulation, divergence (kill-and-resume: tests/test_faults.py)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ALL_BLOCKS, TINY, block_overrides, small_run
from sdd_train.config import load_config
from sdd_train import checkpoint
from sdd_train.train.__main__ import main
from sdd_train.diagnostics.summary import read_records
from sdd_train.train.optim import param_groups
from sdd_train.model import Transformer


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_records(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize("block", ALL_BLOCKS)
def test_every_scheme_learns_in_30_steps(block, tmp_path, data_cache):
    # nGPT's logits are cosines times s_z (init 1), which grows by about lr * sqrt(d) a step: it learns slowly at
    # first, faster at a higher learning rate (the mean of steps 26-30: 5.95 at 3e-3, 5.43 at 1e-2)
    lr = ["optim.lr=1e-2"] if block == "ngpt" else []
    assert main(small_run(tmp_path, data_cache, *block_overrides(block), *lr, "train.max_steps=30",
                          "train.eval_interval=30", "train.precision=fp32")) == 0
    loss = losses(tmp_path)
    first, last = loss[1], sum(loss[s] for s in range(26, 31)) / 5
    assert first == pytest.approx(math.log(512), abs=0.6)
    # ReZero's blocks start as the identity and its gates move by ~lr a step: it learns, slowly, at this budget
    assert last < first - {"rezero": 0.05, "ngpt": 0.5}.get(block, 1.0), (block, first, last)
    records = read_records(tmp_path / "metrics.jsonl")
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(records[0])
    assert any("val_loss" in r for r in records)
    assert (tmp_path / "config.yaml").is_file()
    assert load_config(tmp_path / "config.yaml").model.block == block
    final = checkpoint.latest(tmp_path)
    assert final is not None and checkpoint.read_meta(final)["step"] == 30


def test_rerun_of_finished_run_is_a_no_op(tmp_path, data_cache):
    args = small_run(tmp_path, data_cache, "train.max_steps=3", "train.eval_interval=0")
    assert main(args) == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    assert main(args) == 0
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_gradient_accumulation_matches_one_big_batch(tmp_path, data_cache):
    """Four micro-batches of 2 give the same training run as one batch of 8 (fp32)."""
    common = ["train.max_steps=6", "train.precision=fp32", "train.eval_interval=0", "train.global_batch_size=8"]
    a, b = tmp_path / "accum", tmp_path / "whole"
    assert main(small_run(a, data_cache, *common, "train.micro_batch_size=2")) == 0
    assert main(small_run(b, data_cache, *common, "train.micro_batch_size=8")) == 0
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() == set(range(1, 7))
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-5, abs=1e-5)
    # Adam hides a gradient scale error from the losses; the logged (pre-clip) norm does not
    ga, gb = ([r["grad_norm"] for r in read_records(d / "metrics.jsonl") if "grad_norm" in r] for d in (a, b))
    assert ga == pytest.approx(gb, rel=1e-4)
    assert la[6] < la[1] - 0.3  # and the runs did move


def assert_all_checkpoints_finite(run_dir) -> None:
    """Every checkpoint the run kept, not only the latest, holds finite weights."""
    for path in checkpoint.checkpoint_dir(run_dir).glob("step_*"):
        assert all(torch.isfinite(v).all() for v in checkpoint.read_model_state(path).values()), path.name


def test_divergence_stops_with_exit_3_and_no_bad_checkpoint(tmp_path, data_cache, capsys):
    """lr 1e6: step 1 is finite (and checkpointed), step 2's gradient is NaN: exit 3, step 1 stays the latest."""
    args = small_run(tmp_path, data_cache, "train.max_steps=30", "optim.lr=1e6", "optim.warmup_steps=0",
                     "optim.grad_clip=0", "train.checkpoint_interval=1", "train.eval_interval=0", "model.block=post")
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "not finite" in err and "diverged" in err
    assert checkpoint.read_meta(checkpoint.latest(tmp_path))["step"] == 1
    assert_all_checkpoints_finite(tmp_path)


def test_weights_that_overflow_are_not_checkpointed(tmp_path, data_cache, capsys):
    """A good run resumed with lr 1e39: step 3's loss and gradient are finite but its update makes the
    weights inf; the checkpoint of step 3 is refused (exit 3) and step 2's stays the latest."""
    common = ["train.checkpoint_interval=1", "train.eval_interval=0"]
    assert main(small_run(tmp_path, data_cache, *common, "train.max_steps=2")) == 0
    assert main(small_run(tmp_path, data_cache, *common, "train.max_steps=4", "optim.lr=1e39",
                          "optim.warmup_steps=0")) == 3
    assert "step 3: the model has non-finite parameters; not checkpointing it" in capsys.readouterr().err
    assert checkpoint.read_meta(checkpoint.latest(tmp_path))["step"] == 2
    assert_all_checkpoints_finite(tmp_path)


def test_z_loss_is_logged(tmp_path, data_cache):
    assert main(small_run(tmp_path, data_cache, "train.max_steps=2", "optim.z_loss=1e-4", "train.eval_interval=0")) == 0
    record = read_records(tmp_path / "metrics.jsonl")[-1]
    assert record["z_loss"] > 0


@pytest.mark.parametrize("decay_gains,decay_embeddings", [(True, False), (False, True)])
def test_weight_decay_groups(decay_gains, decay_embeddings):
    cfg = load_config(TINY, [f"optim.decay_gains={decay_gains}", f"optim.decay_embeddings={decay_embeddings}"])
    model = Transformer(cfg.model)
    groups = {g["name"]: g for g in param_groups(model, cfg.optim)}
    assert groups["matrices"]["weight_decay"] == 0.1
    assert groups["gains"]["weight_decay"] == (0.1 if decay_gains else 0.0)
    assert groups["embeddings"]["weight_decay"] == (0.1 if decay_embeddings else 0.0)
    assert groups["embeddings"]["params"] == [model.embed.weight]
    alphas = {id(m.alpha) for m in model.modules() if hasattr(m, "alpha")}
    assert alphas and alphas <= {id(p) for p in groups["gains"]["params"]}
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == model.param_counts().total


# how the chunked loss forms the softmax gradient: eager in one block per chunk, eager in CPU blocks
# of 7 (+ 3) rows, or the kernel torch.compile makes of it (as in compiled training)
SOFTMAX_KERNELS = ["eager", "eager-blocks-of-7", "compiled"]


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("kernel", SOFTMAX_KERNELS)
def test_chunked_linear_cross_entropy_equals_the_plain_loss(monkeypatch, z_loss, kernel):
    """Chunks of 10 rows (the last one ragged: a second shape for the compiled kernel)."""
    from sdd_train.kernels import cross_entropy as loss_module
    from sdd_train.kernels.cross_entropy import linear_cross_entropy, lm_loss

    if kernel == "eager-blocks-of-7":
        monkeypatch.setattr(loss_module, "_CPU_BLOCK_ELEMENTS", 7 * 50)
    torch.manual_seed(0)
    hidden = torch.randn(3, 37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 37))
    plain, ce, z = lm_loss(hidden @ weight.t(), targets, z_loss)
    grads = torch.autograd.grad(2.0 * plain, (hidden, weight))
    chunked, ce_c, z_c = linear_cross_entropy(hidden, weight, targets, z_loss, chunk_size=10,  # 111 = 11 x 10 + 1
                                              compiled=kernel == "compiled")
    grads_c = torch.autograd.grad(2.0 * chunked, (hidden, weight))
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6) and ce_c.item() == pytest.approx(ce.item(), rel=1e-6)
    assert (z_c is None) == (z is None) and (z is None or z_c.item() == pytest.approx(z.item(), rel=1e-6))
    for g, g_c in zip(grads, grads_c):
        assert g_c == pytest.approx(g, rel=1e-5, abs=1e-7)


def test_chunked_loss_computes_only_the_gradients_asked_for():
    """Without grad mode (evaluation) only the loss; with a frozen input only the weight gradient;
    the values those of the plain loss."""
    from sdd_train.kernels.cross_entropy import linear_cross_entropy, lm_loss

    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 9, 16), torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9))
    plain = lm_loss(hidden @ weight.t(), targets)[0]
    (grad_plain,) = torch.autograd.grad(plain, weight)
    with torch.no_grad():
        total, _, _ = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    assert total.grad_fn is None and total.item() == pytest.approx(plain.item(), rel=1e-6)
    total, _, _ = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    (grad_weight,) = torch.autograd.grad(total, weight)
    assert grad_weight == pytest.approx(grad_plain, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kernel", SOFTMAX_KERNELS)
def test_chunked_loss_under_bf16_autocast_is_as_accurate_as_the_plain_path(monkeypatch, kernel):
    """bf16 matmuls, fp32 softmax, the gradient rounded to bf16 once: loss and gradients as close to
    float64 as the plain autocast path's (chunks of 10)."""
    import torch.nn.functional as F

    from sdd_train.kernels import cross_entropy as loss_module
    from sdd_train.kernels.cross_entropy import linear_cross_entropy, lm_loss

    if kernel == "eager-blocks-of-7":
        monkeypatch.setattr(loss_module, "_CPU_BLOCK_ELEMENTS", 7 * 50)
    torch.manual_seed(0)
    hidden = torch.randn(3, 37, 16).bfloat16().requires_grad_()
    weight = torch.randn(50, 16).requires_grad_()
    targets = torch.randint(0, 50, (3, 37))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = lm_loss(h64 @ w64.t(), targets, 1e-3)[0]
    ref_grads = torch.autograd.grad(ref, (h64, w64))

    def errors(loss_fn) -> list[float]:
        with torch.autocast("cpu", torch.bfloat16):
            loss = loss_fn()
        grads = torch.autograd.grad(loss, (hidden, weight))
        return [abs(loss.item() - ref.item()) / ref.item()] + [
            ((g.double() - r).norm() / r.norm()).item() for g, r in zip(grads, ref_grads)]

    plain = errors(lambda: lm_loss(F.linear(hidden, weight), targets, 1e-3)[0])
    chunked = errors(lambda: linear_cross_entropy(hidden, weight, targets, 1e-3, chunk_size=10,
                                                  compiled=kernel == "compiled")[0])
    assert max(plain) < 1e-2
    for got, want in zip(chunked, plain):
        assert got <= 1.5 * want + 1e-6


def test_training_with_the_chunked_loss_matches_the_plain_loss(tmp_path, data_cache):
    common = ["train.max_steps=5", "train.precision=fp32", "train.eval_interval=0", "optim.z_loss=1e-4"]
    assert main(small_run(tmp_path / "plain", data_cache, *common, "train.loss_chunk_size=0")) == 0
    assert main(small_run(tmp_path / "chunked", data_cache, *common, "train.loss_chunk_size=100")) == 0
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "chunked")
    assert a.keys() == b.keys() == set(range(1, 6))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)


def test_the_gradient_norm_sums_in_the_parameters_order_whatever_their_meshes():
    """The same gradients give the same norm, bitwise, however their DTensors' mesh objects group them. A run
    after another in the same process (make matrix's rank pools) got mesh objects grouped otherwise, summed
    its squares in another order and logged a norm one ulp off its reference."""
    from sdd_train.train.train_module import grad_norm_and_clip

    for seed in range(5):  # grouped by mesh, 2 of these 5 sums came out one ulp apart
        torch.manual_seed(seed)
        params = [torch.nn.Parameter(torch.zeros(7)) for _ in range(40)]
        for p in params:
            p.grad = torch.randn(7) * 10 ** torch.empty(()).uniform_(-1, 1).item()
        alone = grad_norm_and_clip(params, max_norm=math.inf)
        meshes = [object(), object()]
        for i, p in enumerate(params):
            p.device_mesh = meshes[i % 3 == 0]
        assert torch.equal(grad_norm_and_clip(params, max_norm=math.inf), alone), seed


def test_the_gradient_norm_is_accurate_for_a_large_gradient_and_clips_to_it():
    """A 16M-element fp32 gradient beside a small one: the norm is the float64 one to 1e-6 (one fp32 reduction
    over the whole tensor on CPU is ~6e-4 off, which made one process and 4 ranks log different norms), and
    clipping scales every gradient by max_norm / norm."""
    from sdd_train.kernels import sum_of_squares
    from sdd_train.train.train_module import grad_norm_and_clip

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(16_000_077)), torch.nn.Parameter(torch.zeros(3, 5))]
    for p in params:
        p.grad = torch.randn(p.shape) * 1e-3
    truth = math.sqrt(sum(p.grad.double().square().sum().item() for p in params))
    before = [p.grad.clone() for p in params]
    total = grad_norm_and_clip(params, max_norm=1e-2)
    assert total.item() == pytest.approx(truth, rel=1e-6)
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g * (1e-2 / (total + 1e-6)), rtol=1e-6, atol=0)
    x = torch.randn(100_001, dtype=torch.float64)
    assert sum_of_squares(x).item() == pytest.approx(x.square().sum().item(), rel=1e-14)  # float64 stays float64
