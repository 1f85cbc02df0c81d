"""MoE: dispatch vs a per-token float64 reference, gradients, auxiliary losses, sizes, training."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIGS, small_run
from sdd_train.config import ModelConfig, MoEConfig, load_config
from sdd_train.model import Transformer
from sdd_train.model.moe import MoE
from sdd_train import checkpoint
from sdd_train.train import train_module
from sdd_train.train.__main__ import main
from sdd_train.diagnostics.summary import read_records

MOE_PAPER = str(CONFIGS / "moe_paper.yaml")


def moe_layer(n_experts: int, top_k: int, sdd: bool, renormalize: bool = False, grouped_mm: str = "auto",
              d: int = 16, hidden: int = 8, **routing) -> MoE:
    cfg = ModelConfig(d_model=d, n_heads=2, n_kv_heads=2, ffn="moe", n_layers=2,
                      moe=MoEConfig(n_experts=n_experts, top_k=top_k, expert_hidden=hidden, renormalize=renormalize,
                                    grouped_mm=grouped_mm, **routing))
    layer = MoE(cfg, sdd=sdd).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def rms(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert, straight from SPEC section 6 (float64)."""
    w_router = layer.router.weight
    w_proj, w_out = layer.ff_proj.weight, layer.ff_out.weight
    sdd = layer.ff_proj.alpha is not None
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(w_router @ x[t], dim=-1)
        weights, experts = probs.topk(layer.top_k)
        if layer.renormalize:
            weights = weights / weights.sum()
        for weight, e in zip(weights, experts.tolist()):
            h = w_proj[e] @ x[t]
            up, gate = h.chunk(2)
            if sdd:
                up = layer.ff_proj.alpha[e].chunk(2)[0] * rms(up)
                gate = layer.ff_proj.alpha[e].chunk(2)[1] * rms(gate)
            y = w_out[e] @ (F.silu(gate) * up)
            if sdd:
                y = layer.ff_out.alpha[e] * rms(y)
            out[t] += weight * y
    return out


@pytest.mark.parametrize("n_experts,top_k,sdd,renormalize", [
    (8, 2, False, False), (8, 2, True, False), (6, 6, True, False), (8, 3, False, True), (64, 8, True, False),
])
def test_dispatch_matches_per_token_reference(n_experts, top_k, sdd, renormalize):
    torch.manual_seed(0)
    layer = moe_layer(n_experts, top_k, sdd, renormalize)
    u = F.normalize(torch.randn(16, dtype=torch.float64), dim=0)
    x = torch.randn(2, 7, 16, dtype=torch.float64) + 3 * u
    with torch.no_grad():
        layer.router.weight[-1] = -10 * u  # the last expert's logit is far below the others: it gets no token
    ours, aux = layer(x)
    assert aux.load[-1] == 0 or top_k == n_experts  # the empty-expert path runs too
    assert int(aux.load.sum()) == 14 * top_k  # dropless: every (token, choice) computed
    torch.testing.assert_close(ours.reshape(-1, 16), reference(layer, x.reshape(-1, 16)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grouped_mm", ["auto", "loop"])
def test_gradients_match_reference(grouped_mm):
    torch.manual_seed(1)
    layer = moe_layer(8, 2, sdd=True, grouped_mm=grouped_mm)
    x = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(12, 16, dtype=torch.float64)
    (layer(x)[0] * g).sum().backward()
    ours = {n: p.grad.clone() for n, p in layer.named_parameters()} | {"x": x.grad.clone()}
    layer.zero_grad()
    x.grad = None
    (reference(layer, x) * g).sum().backward()
    theirs = {n: p.grad.clone() for n, p in layer.named_parameters()} | {"x": x.grad.clone()}
    assert set(ours) >= {"router.weight", "ff_proj.weight", "ff_proj.alpha", "ff_out.weight", "ff_out.alpha", "x"}
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-11, msg=name)


def reference_sparse_glu(layer: MoE, x: torch.Tensor, n_experts: int, hidden: int) -> torch.Tensor:
    """The reference's ``SparseGLU.forward`` (kaihemo/SDD moe/olmo/model.py) with its block-sparse stk ops
    written as dense matrices: each routed row has ones on its own expert's ``hidden`` columns of the
    [rows, E * hidden] topology, and the output gain is ``dsd(ones_like(x1), G) / E`` with
    G[e * hidden + f, :] = g_out[e, :], i.e. a sum over the expert's hidden columns, divided by E."""
    w_router, w_proj, w_out = layer.router.weight, layer.ff_proj.weight, layer.ff_out.weight
    g_out = layer.ff_out.alpha  # [E, d]
    g_reorg = g_out.repeat_interleave(hidden, dim=0)  # [E * hidden, d]: row e * hidden + f = g_out[e]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(w_router @ x[t], dim=-1)
        weights, experts = probs.topk(layer.top_k)
        for weight, e in zip(weights, experts.tolist()):
            up, gate = (w_proj[e] @ x[t]).chunk(2)
            up = layer.ff_proj.alpha[e].chunk(2)[0] * rms(up)
            gate = layer.ff_proj.alpha[e].chunk(2)[1] * rms(gate)
            ones_row = torch.zeros(n_experts * hidden, dtype=x.dtype)
            ones_row[e * hidden:(e + 1) * hidden] = 1.0  # stk.ops.ones_like on this row's topology blocks
            gain = ones_row @ g_reorg / n_experts
            out[t] += weight * gain * rms(w_out[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("n_experts,hidden", [(4, 8), (8, 8), (2, 16)])
def test_sdd_out_gain_scale_reproduces_the_reference_sparse_gain(n_experts, hidden):
    """model.moe.sdd_out_gain_scale = expert_hidden / n_experts computes what the reference's sparse ops do."""
    torch.manual_seed(3)
    cfg = ModelConfig(d_model=16, n_heads=2, n_kv_heads=2, ffn="moe", n_layers=2,
                      moe=MoEConfig(n_experts=n_experts, top_k=2, expert_hidden=hidden,
                                    sdd_out_gain_scale=hidden / n_experts))
    layer = MoE(cfg, sdd=True).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(9, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], reference_sparse_glu(layer, x, n_experts, hidden), rtol=1e-10, atol=1e-12)
    default = MoE(ModelConfig(d_model=16, n_heads=2, n_kv_heads=2, ffn="moe", n_layers=2,
                              moe=MoEConfig(n_experts=n_experts, top_k=2, expert_hidden=hidden)), sdd=True).double()
    default.load_state_dict(layer.state_dict())
    torch.testing.assert_close(default(x)[0] * (hidden / n_experts), layer(x)[0], rtol=1e-10, atol=1e-12)


def test_grouped_mm_and_loop_agree_in_float32(monkeypatch):
    """'auto' runs torch._grouped_mm on CPU where it has a CPU kernel (torch >= 2.9), the loop before."""
    torch.manual_seed(2)
    a = moe_layer(8, 2, sdd=True, grouped_mm="auto", d=32, hidden=16).float()
    b = moe_layer(8, 2, sdd=True, grouped_mm="loop", d=32, hidden=16).float()
    b.load_state_dict(a.state_dict())
    x = torch.randn(40, 32)
    calls = []
    if hasattr(torch, "_grouped_mm"):
        grouped_mm = torch._grouped_mm
        monkeypatch.setattr(torch, "_grouped_mm", lambda *args, **kw: calls.append(1) or grouped_mm(*args, **kw))
    x = x.requires_grad_()
    outputs = []
    for layer in (a, b):
        y = layer(x)[0]
        y.square().mean().backward()
        outputs.append((y, x.grad, *(p.grad for p in layer.parameters())))
        x.grad = None
    for ours, loop in zip(*outputs):
        torch.testing.assert_close(ours, loop, rtol=1e-5, atol=1e-6)
    # forward: the up and the down projection; backward: their input and weight gradients
    assert len(calls) == (6 if torch.__version__ >= (2, 9) else 0)


@pytest.mark.parametrize("grouped_mm", ["auto", "loop"])
def test_a_layer_copies_its_counts_to_the_host_at_most_once_and_its_expert_weights_never(grouped_mm, monkeypatch):
    """On a GPU each host read of the row counts waits for the device: a layer makes one host copy
    (``expert_counts``; none where the grouped GEMM runs), and the loop's four GEMMs, forward and backward,
    read only it. The expert weights reach the GEMMs as (transposed) views of the parameters, never copies."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sdd_train.model import moe

    from sdd_train.kernels.grouped_mm import grouped_mm_runs

    torch.manual_seed(0)
    layer = moe_layer(4, 2, sdd=True, grouped_mm=grouped_mm, d=32, hidden=16).float()
    loops = grouped_mm == "loop" or not grouped_mm_runs(torch.device("cpu"), torch.float32, (32, 32, 32, 16))
    copies: list[torch.Tensor] = []
    real_counts = moe.expert_counts

    def host_copy(counts, *args):
        out = real_counts(counts, *args)
        if out is counts and loops:  # a GPU's host copy is a new tensor; on CPU .cpu() is counts
            out = out.clone()
            copies.append(out)
        return out

    read: list[int] = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(moe, "expert_counts", host_copy)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: read.append(t.data_ptr()) or tolist(t))
    storages = {p.untyped_storage().data_ptr() for p in (layer.ff_proj.weight, layer.ff_out.weight)}
    weight_args: list[bool] = []

    class WeightViews(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.sdd_train.expert_mm.default:
                weight_args.append(args[1].untyped_storage().data_ptr() in storages)
            return func(*args, **(kwargs or {}))

    with WeightViews():
        y, _ = layer(torch.randn(24, 32))
        y.square().mean().backward()
    assert len(copies) == (1 if loops else 0)
    assert read and set(read) == {copies[0].data_ptr()} if loops else not read
    assert weight_args == [True] * 4  # forward: up and down projections; backward: their input gradients


def test_aux_losses_match_hand_computation():
    """Fixed routing: 4 tokens, 4 experts, top-2, logits chosen by hand."""
    layer = moe_layer(4, 2, sdd=False, d=4)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4, dtype=torch.float64))
    x = torch.tensor([[3.0, 2, 0, 0], [3, 0, 2, 0], [0, 3, 2, 0], [1, 1, 1, 1]], dtype=torch.float64)
    aux = layer(x)[1]
    probs = torch.softmax(x, dim=-1)
    # top-2 picks: token0 {0,1}, token1 {0,2}, token2 {1,2}, token3 ties -> topk picks two of them
    counts = torch.zeros(4, dtype=torch.float64)
    for row in probs.topk(2, dim=-1).indices:
        counts[row] += 1
    assert aux.load.tolist() == counts.long().tolist()
    expected_lb = 4 / (2 * 4) * (counts * probs.mean(0)).sum()
    expected_z = torch.logsumexp(x, -1).pow(2).mean()
    assert aux.lb_loss.item() == pytest.approx(expected_lb.item(), rel=1e-12)
    assert aux.router_z_loss.item() == pytest.approx(expected_z.item(), rel=1e-12)
    assert aux.logit_rms.item() == pytest.approx(x.pow(2).mean().sqrt().item(), rel=1e-6)  # the router's scale
    # perfectly balanced routing gives lb = 1 (its minimum for uniform router probabilities)
    with torch.no_grad():
        layer.router.weight.zero_()
    assert layer(torch.randn(8, 4, dtype=torch.float64))[1].lb_loss.item() == pytest.approx(1.0)
    stats = train_module.expert_load_stats(torch.tensor([[4, 4, 4, 4], [16, 0, 0, 0]]))  # two layers' counts
    assert stats.pop("moe/layer_0/load_entropy") == pytest.approx(1.0)
    assert stats == {"moe/layer_0/load_min": 4, "moe/layer_0/load_max": 4, "moe/layer_1/load_min": 0,
                     "moe/layer_1/load_max": 16, "moe/layer_1/load_entropy": 0.0}


def test_sigmoid_gating_and_the_selection_bias_match_a_hand_computation():
    """Sigmoid gating: experts by their sigmoid scores, combine weights those scores over their sum, the
    load-balancing loss on each token's scores over their sum. A selection bias changes which experts
    are chosen, not what a chosen one weighs; ``balance`` moves it by the rate towards the mean load."""
    layer = moe_layer(4, 2, sdd=False, d=4, gating="sigmoid", bias_update_rate=0.25)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4, dtype=torch.float64))
    x = torch.tensor([[3.0, 2, 0, -1], [0, 1, 2, 3]], dtype=torch.float64)
    s = torch.sigmoid(x)
    _, probs, weights, experts = layer.route(x)
    assert experts.tolist() == [[0, 1], [3, 2]]
    assert torch.allclose(weights, torch.stack([s[0, [0, 1]] / s[0, [0, 1]].sum(), s[1, [3, 2]] / s[1, [3, 2]].sum()]))
    assert torch.allclose(probs, s / s.sum(-1, keepdim=True))
    counts = torch.tensor([1.0, 1, 1, 1])
    assert layer(x)[1].lb_loss.item() == pytest.approx((4 / (2 * 2) * (counts * probs.mean(0)).sum()).item())
    layer.expert_bias.copy_(torch.tensor([0.0, 0, 0.9, 0]))  # expert 2 now beats expert 1 for token 0
    _, _, weights, experts = layer.route(x)
    assert experts[0].tolist() == [2, 0] and torch.allclose(weights[0], s[0, [2, 0]] / s[0, [2, 0]].sum())
    layer.balance(torch.tensor([5, 1, 3, 3]), rate=0.25)  # mean 3: above, below, at, at
    assert layer.expert_bias.tolist() == pytest.approx([-0.25, 0.25, 0.9, 0.0])


def test_the_sequence_wise_load_balancing_loss_matches_a_hand_computation():
    """lb_loss_scope=sequence: each sequence's own pair counts and mean probabilities, averaged; the two
    scopes agree on one sequence and differ where the sequences balance each other out."""
    x = torch.tensor([[[3.0, 2, 0, 0], [3, 2, 0, 0]], [[0, 0, 2, 3], [0, 0, 3, 2]]], dtype=torch.float64)
    losses = {}
    for scope in ("micro_batch", "sequence"):
        layer = moe_layer(4, 2, sdd=False, d=4, lb_loss_scope=scope)
        with torch.no_grad():
            layer.router.weight.copy_(torch.eye(4, dtype=torch.float64))
        losses[scope] = layer(x)[1].lb_loss.item()
        assert layer(x[:1])[1].lb_loss.item() == pytest.approx(layer(x[:1].reshape(2, 4))[1].lb_loss.item())
    probs = torch.softmax(x, -1)
    per_sequence = []
    for b in range(2):
        counts = torch.zeros(4, dtype=torch.float64)
        for row in probs[b].topk(2, dim=-1).indices:
            counts[row] += 1
        per_sequence.append(4 / (2 * 2) * (counts * probs[b].mean(0)).sum())
    assert losses["sequence"] == pytest.approx(torch.stack(per_sequence).mean().item(), rel=1e-12)
    assert losses["micro_batch"] < losses["sequence"]  # each sequence uses two experts, the batch all four


def test_aux_free_balancing_moves_the_bias_in_training_and_checkpoints_it(data_cache, tmp_path):
    """Each update moves every layer's bias by exactly the rate per expert (or not, at the mean), from the
    step's global load; the checkpoint holds it, and a run without the key has no such buffer."""
    from sdd_train.checkpoint import read_model_state

    args = small_run(tmp_path, data_cache, "model.ffn=moe", "model.moe.n_experts=4", "model.moe.top_k=2",
                     "model.moe.expert_hidden=16", "model.moe.bias_update_rate=0.01", "train.max_steps=3",
                     "train.precision=fp32")
    assert main(args) == 0
    state = read_model_state(checkpoint.latest(tmp_path))
    biases = [v for k, v in state.items() if k.endswith("expert_bias")]
    assert len(biases) == 2
    for bias in biases:
        steps = bias.double() / 0.01  # a sum of three +-1 / 0 moves
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 3 and steps.abs().sum() > 0
    assert not any("expert_bias" in k for k in moe_layer(4, 2, sdd=False).state_dict())


def test_a_global_batch_step_counts_its_earlier_micro_batches_pairs():
    """lb_loss_scope=global_batch, one process, a step of 2 micro-batches: the step's balancing loss is the mean
    of the first micro-batch's own and the second's with both micro-batches' pairs counted (each forward run
    here by hand, with the step's weights), which is not what counting each micro-batch alone gives."""
    from sdd_train.config import RunConfig
    from sdd_train.distributed.world import World

    model_cfg = ModelConfig(d_model=16, n_heads=2, n_kv_heads=2, ffn="moe", n_layers=2, vocab_size=31,
                            max_seq_len=8, moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=8,
                                                         lb_loss_scope="global_batch"))
    cfg = load_config(str(CONFIGS / "tiny_moe.yaml"), ["train.precision=fp32", "train.compile=false"])
    cfg = RunConfig(**{**cfg.__dict__, "model": model_cfg})
    module = train_module.TrainModule(cfg, World(0, 1, 0, torch.device("cpu")))
    torch.manual_seed(1)
    tokens = torch.randint(0, 31, (2, 3, 9))  # 2 micro-batches of 3 sequences
    batches = [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]
    with torch.no_grad():
        first = module.model(batches[0]["inputs"], targets=batches[0]["targets"], loss_chunk=0)
        alone = module.model(batches[1]["inputs"], targets=batches[1]["targets"], loss_chunk=0)
        second = module.model(batches[1]["inputs"], targets=batches[1]["targets"], loss_chunk=0,
                              earlier_counts=first.balance_counts)
    assert first.balance_counts.sum(-1).tolist() == [3 * 8 * 2] * 2  # every pair, per layer
    step = module.train_batch(batches, accum=2, step=1)
    expected = (first.moe_lb_loss + second.moe_lb_loss) / 2
    torch.testing.assert_close(step.losses[2], expected.float(), rtol=1e-6, atol=0)
    assert abs(second.moe_lb_loss - alone.moe_lb_loss) > 1e-4


def test_the_default_router_z_loss_weight_is_the_references_as_it_applies_it():
    """The reference's moe_zloss_weight 0.001 divides the summed lse^2 by layers x tokens x top_k; ours is
    the mean over layers and tokens, so the default weight is 0.001 / top_k, and the loss uses it."""
    assert load_config(MOE_PAPER).model.moe.router_z_loss_weight() == pytest.approx(0.001 / 8)
    assert load_config(str(CONFIGS / "tiny_moe.yaml")).model.moe.router_z_loss_weight() == pytest.approx(0.001 / 2)
    assert MoEConfig(top_k=2, z_loss_weight=0.01).router_z_loss_weight() == 0.01
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, n_kv_heads=2, ffn="moe", n_layers=2, vocab_size=31, max_seq_len=8,
                      moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=8))
    tokens = torch.randint(0, 31, (2, 8))
    out = Transformer(cfg)(tokens[:, :-1], targets=tokens[:, 1:])
    expected = out.ce + 0.01 * out.moe_lb_loss + 0.0005 * out.moe_router_z_loss
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)


def test_paper_moe_hand_count():
    cfg = load_config(MOE_PAPER).model
    d, L, V, E, k, h, hd = 1024, 32, 50304, 64, 8, 512, 64
    attn = 3 * d * d + d * d + 2 * hd + d + d  # q/k/v + out, per-head q/k norms, context norm, attn_out alpha
    experts = E * (d * 2 * h + h * d) + E * (2 * h + d)  # matrices + per-expert SDD gains
    router = d * E
    norms = 2 * d
    total = 2 * V * d + L * (attn + experts + router + norms) + d  # untied embedding and head, final norm
    with torch.device("meta"):
        counts = Transformer(cfg).param_counts()
    assert counts.total == total
    assert 3.4e9 < counts.total < 3.5e9
    active = counts.total - V * d - L * E * (3 * d * h + 2 * h + d) * (E - k) // E
    assert counts.active == active
    assert 0.58e9 < counts.active < 0.60e9  # the paper's "588M active"


def test_top_k_above_experts_is_a_config_error(capsys):
    assert main([MOE_PAPER, "model.moe.top_k=65", "--dry-run"]) == 2
    assert "model.moe.top_k: 65 is more than model.moe.n_experts=64" in capsys.readouterr().err


def test_tiny_moe_trains_and_logs_expert_load(data_cache, tmp_path, monkeypatch):
    """The loss falls, and each logged expert load is of every routed (token, choice) pair of the step:
    both micro-batches, each pair once."""
    loads = []  # the summed [layers, experts] counts the trainer turns into the logged load_min/max/entropy
    stats = train_module.expert_load_stats
    monkeypatch.setattr(train_module, "expert_load_stats", lambda counts: loads.append(counts.clone()) or stats(counts))
    args = small_run(tmp_path, data_cache, "model.ffn=moe", "model.moe.n_experts=8", "model.moe.top_k=2",
                     "model.moe.expert_hidden=32", "model.block=sdd", "train.max_steps=30", "train.log_interval=10",
                     "train.eval_interval=30")
    assert main(args) == 0
    records = [r for r in read_records(tmp_path / "metrics.jsonl") if "loss" in r]
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    last = records[-1]
    assert last["moe_lb_loss"] >= 0.99 and last["moe_router_z_loss"] > 0  # lb >= 1 up to sampling
    assert [r["step"] for r in records] == [1, 10, 20, 30] and len(loads) == len(records)
    # dropless, in each layer: sequences x seq_len x top_k
    assert [c.sum(-1).tolist() for c in loads] == [[8 * 64 * 2] * 2] * len(loads)
    for layer, counts in enumerate(loads[-1]):
        assert last[f"moe/layer_{layer}/load_min"] == int(counts.min())
        assert last[f"moe/layer_{layer}/load_max"] == int(counts.max())
        assert 0 < last[f"moe/layer_{layer}/load_entropy"] <= 1
    assert checkpoint.read_meta(checkpoint.latest(tmp_path))["step"] == 30
    # the router diagnostics: each window's pairs (steps 1, 2-10, 11-20, 21-30) in moe.jsonl, its shares summing to 1
    windows = read_records(tmp_path / "moe.jsonl")
    assert [(w["step"], w["steps"]) for w in windows] == [(1, 1), (10, 9), (20, 10), (30, 10)]
    for w, r in zip(windows, records):
        assert all(sum(layer) == pytest.approx(1, abs=1e-5) for layer in w["share"])
        assert all(r[f"moe/layer_{i}/idle_experts"] == sum(s == 0 for s in layer) for i, layer in enumerate(w["share"]))
        assert all(r[f"moe/layer_{i}/router_logit_rms"] > 0 for i in range(2))


class FakeTrainer:
    """What the router callback sees of the trainer: the log steps, the metrics it records, its writes."""

    def __init__(self, log_interval: int):
        self.log_interval, self.metrics, self.records = log_interval, {}, []

    def is_log_step(self, step: int) -> bool:
        return step % self.log_interval == 0

    def record_metric(self, key: str, value: float) -> None:
        self.metrics[key] = value

    def write(self, stream: str, record: dict, **kwargs) -> None:
        self.records.append((stream, record))


def test_router_diagnostics_over_a_window_match_a_hand_computation_and_survive_a_resume():
    """Two layers of 3 experts over a 3-step window: the loads add up, an expert idle all window is counted,
    the ratio is most over least loaded (an idle expert as one pair), the logit RMS is the window's mean.
    Resumed from its state after step 1, the callback writes the same record."""
    from types import SimpleNamespace

    from sdd_train.train.callbacks.router import RouterCallback

    steps = [([[4, 0, 2], [3, 3, 0]], [1.0, 2.0]), ([[2, 0, 4], [3, 3, 0]], [2.0, 4.0]),
             ([[6, 0, 0], [0, 0, 6]], [3.0, 0.0])]
    outs = [SimpleNamespace(expert_load=torch.tensor(load), router_logit_rms=torch.tensor(rms), finite=True)
            for load, rms in steps]

    def run(callback, trainer, from_step=1):
        for step, out in enumerate(outs[from_step - 1:], from_step):
            callback.post_train_step(trainer, step, out)

    whole, trainer = RouterCallback(), FakeTrainer(log_interval=3)
    run(whole, trainer)
    assert trainer.metrics == {"moe/layer_0/idle_experts": 1, "moe/layer_0/load_ratio": 12.0,
                               "moe/layer_0/router_logit_rms": 2.0, "moe/layer_1/idle_experts": 0,
                               "moe/layer_1/load_ratio": 1.0, "moe/layer_1/router_logit_rms": 2.0}
    (stream, record), = trainer.records
    assert stream == "moe" and (record["step"], record["steps"]) == (3, 3)
    assert record["share"] == [pytest.approx([2 / 3, 0, 1 / 3], abs=1e-6), pytest.approx([1 / 3] * 3, abs=1e-6)]
    first = RouterCallback()
    first.post_train_step(FakeTrainer(3), 1, outs[0])
    resumed, again = RouterCallback(), FakeTrainer(log_interval=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as meta.json keeps it
    run(resumed, again, from_step=2)
    assert again.metrics == trainer.metrics and again.records == trainer.records


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_matches_loop_on_gpu():
    """bf16 on CUDA: torch._grouped_mm (sm90+) or the loop, forward and backward, against the loop."""
    torch.manual_seed(0)
    layers = [moe_layer(16, 4, sdd=True, grouped_mm=mode, d=64, hidden=32).float().cuda() for mode in ("auto", "loop")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(256, 64, device="cuda")
    grads = []
    for layer in layers:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = layer(x)
        y.float().square().mean().backward()
        grads.append((y.float(), layer.ff_proj.weight.grad.clone(), layer.router.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


ALL_RANKS_WORKER = """
import json, sys
import torch, torch.distributed as dist
from sdd_train.config import ModelConfig, MoEConfig
from sdd_train.distributed.expert_parallel import apply_all_ranks_balance
from sdd_train.model.moe import MoE, step_balance_loss

dist.init_process_group("gloo")
rank = dist.get_rank()
results = {}
for scope in ("all_ranks", "micro_batch"):
    cfg = ModelConfig(d_model=4, n_heads=2, n_kv_heads=2, ffn="moe", n_layers=2,
                      moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=8, lb_loss_scope=scope))
    layer = MoE(cfg, sdd=False).double()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4, dtype=torch.float64))
    apply_all_ranks_balance([layer])
    x = torch.tensor(json.loads(sys.argv[1])[rank], dtype=torch.float64)
    lb = layer(x)[1].lb_loss
    lb.backward()
    grad = layer.router.weight.grad
    dist.all_reduce(grad)  # the ranks' mean, as FSDP2 takes it
    results[scope] = {"lb": lb.item(), "grad": (grad / 2).tolist()}
# global_batch: a second micro-batch counts the pairs of the first one, of both ranks, as well as its own
cfg = ModelConfig(d_model=4, n_heads=2, n_kv_heads=2, ffn="moe", n_layers=2,
                  moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=8, lb_loss_scope="global_batch"))
layer = MoE(cfg, sdd=False).double()
with torch.no_grad():
    layer.router.weight.copy_(torch.eye(4, dtype=torch.float64))
apply_all_ranks_balance([layer])
first = layer(torch.tensor(json.loads(sys.argv[1])[rank], dtype=torch.float64))[1]
second = layer(torch.tensor(json.loads(sys.argv[2])[rank], dtype=torch.float64))[1]
results["global_batch"] = {"lb": [first.lb_loss.item(), step_balance_loss(second, first.balance_counts[0]).item()]}
if rank == 0:
    print(json.dumps(results))
dist.destroy_process_group()
"""


def test_the_all_ranks_load_balancing_loss_counts_every_ranks_pairs(tmp_path):
    """lb_loss_scope=all_ranks on 2 gloo ranks, each with 2 tokens: rank 0's go to experts {0, 1}, rank 1's to
    {2, 3}. Counted over both ranks the load is even, so each rank's loss is E / 8 * sum_e 2 P_e = 1 (against
    ~1.9 counted per rank), and the ranks' mean gradient is that of one process routing all 4 tokens."""
    import json
    import os
    import subprocess
    import sys

    tokens = [[[3.0, 2, 0, 0], [3, 2, 0, 0]], [[0, 0, 2, 3], [0, 0, 3, 2]]]
    second = [[[3.0, 0, 2, 0], [0, 3, 0, 2]], [[3, 2, 0, 0], [2, 0, 3, 0]]]  # a second micro-batch per rank
    script = tmp_path / "worker.py"
    script.write_text(ALL_RANKS_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), json.dumps(tokens), json.dumps(second)], capture_output=True, text=True,
                          timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["all_ranks"]["lb"] == pytest.approx(1.0, rel=1e-12)
    probs = torch.softmax(torch.tensor(tokens[0], dtype=torch.float64), -1)
    assert results["micro_batch"]["lb"] == pytest.approx((4 / 4 * 2 * probs.mean(0)[:2].sum()).item(), rel=1e-12)
    one = moe_layer(4, 2, sdd=False, d=4)  # one process, all 4 tokens in one micro-batch
    with torch.no_grad():
        one.router.weight.copy_(torch.eye(4, dtype=torch.float64))
    one(torch.tensor(tokens, dtype=torch.float64).reshape(4, 4))[1].lb_loss.backward()
    assert torch.allclose(torch.tensor(results["all_ranks"]["grad"], dtype=torch.float64), one.router.weight.grad,
                          rtol=1e-10, atol=1e-14)
    assert not torch.allclose(torch.tensor(results["micro_batch"]["grad"], dtype=torch.float64), one.router.weight.grad)
    # global_batch, rank 0: the first micro-batch as all_ranks; the second one's f counts all 8 tokens' pairs
    # (both micro-batches of both ranks: 5, 4, 4 and 3 pairs) with P of its own 2 tokens
    chosen = [torch.softmax(torch.tensor(batch, dtype=torch.float64), -1).topk(2, -1).indices
              for batch in tokens + second]
    f = torch.bincount(torch.cat(chosen).reshape(-1), minlength=4).double()
    p0 = torch.softmax(torch.tensor(second[0], dtype=torch.float64), -1).mean(0)
    assert results["global_batch"]["lb"][0] == pytest.approx(1.0, rel=1e-12)
    assert results["global_batch"]["lb"][1] == pytest.approx((4 / f.sum() * (f * p0).sum()).item(), rel=1e-12)
    assert f.tolist() == [5.0, 4.0, 4.0, 3.0]
