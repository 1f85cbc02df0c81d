"""Muon (optim.name=muon, sdd_train/train/muon.py): its update against a float64 reference and against
torch.optim.Muon, the AdamW part against torch.optim.AdamW, which parameters each updates, and that a
model trains with it (2 ranks vs one process: test_distributed.py; resume after SIGKILL: test_faults.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import small_model_cfg, small_run
from sdd_train.config import MuonConfig, OptimConfig, load_config
from sdd_train.diagnostics.summary import read_records
from sdd_train.model import Transformer
from sdd_train.train.__main__ import main
from sdd_train.train.muon import NS_COEFFICIENTS, lr_scale, orthogonalise, resolve_ns_dtype
from sdd_train.train.optim import build_optimizer, param_groups


class Toy(nn.Module):
    """Each kind of parameter once: a tall, a wide and a square matrix, an expert stack, a gain, an SDD
    alpha, the embedding and the head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.tall = nn.Parameter(torch.randn(48, 16) / 8)
        self.wide = nn.Parameter(torch.randn(16, 48) / 8)
        self.square = nn.Parameter(torch.randn(16, 16) / 8)
        self.experts = nn.Parameter(torch.randn(3, 8, 12) / 8)
        self.norm = nn.Parameter(torch.ones(16))
        self.alpha = nn.Parameter(torch.full((16,), 0.5))
        self.lm_head = nn.Linear(16, 10, bias=False)


def optim_cfg(**muon) -> OptimConfig:
    return OptimConfig(name="muon", lr=0.02, weight_decay=0.1, muon=MuonConfig(**muon))


def reference_muon_step(w, g, buf, lr, wd, cfg: MuonConfig):
    """One Muon step in float64, written from the update's definition (one matrix at a time)."""
    a, b, c = NS_COEFFICIENTS
    buf = cfg.momentum * buf + (1 - cfg.momentum) * g
    u = (1 - cfg.momentum) * g + cfg.momentum * buf if cfg.nesterov else buf
    out = torch.empty_like(u)
    for i, m in enumerate(u.reshape(-1, *u.shape[-2:])):
        x = m.T if m.shape[0] > m.shape[1] else m
        x = x / x.norm()
        for _ in range(cfg.ns_steps):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        out.view(-1, *u.shape[-2:])[i] = x.T if m.shape[0] > m.shape[1] else x
    rows, cols = w.shape[-2:]
    scale = 0.2 * math.sqrt(max(rows, cols)) if cfg.lr_adjust == "match_rms_adamw" else math.sqrt(max(1, rows / cols))
    return w * (1 - lr * wd) - lr * scale * out, buf


@pytest.mark.parametrize("adjust,nesterov", [("match_rms_adamw", True), ("original", False)])
def test_two_steps_equal_a_float64_reference_and_adamw(adjust, nesterov):
    """The hidden matrices (expert stack included) follow the float64 update to the rounding of fp32
    weights (4 ulps of the largest, where the two steps move them by over 10^4 ulps: an update off by
    1e-3 of itself fails); the embedding, head, gain and alpha take torch.optim.AdamW's update to the bit."""
    torch.manual_seed(0)
    model, twin = Toy(), Toy()
    twin.load_state_dict(model.state_dict())
    cfg = optim_cfg(lr_adjust=adjust, nesterov=nesterov, ns_dtype="fp32")
    opt = build_optimizer(model, cfg)
    adam_groups = [{k: v for k, v in g.items() if k in ("params", "weight_decay")}
                   for g in param_groups(twin, cfg) if not g["muon"]]
    adam = torch.optim.AdamW(adam_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
    names = dict(model.named_parameters())
    hidden = {"tall", "wide", "square", "experts"}
    ref = {n: (names[n].detach().double(), torch.zeros_like(names[n], dtype=torch.float64)) for n in hidden}
    for _ in range(2):
        grads = {n: torch.randn_like(p) for n, p in names.items()}
        for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            p.grad, q.grad = grads[n].clone(), grads[n].clone()
        opt.step()
        adam.step()
        for n in hidden:
            weights, momentum = ref[n]
            ref[n] = reference_muon_step(weights, grads[n].double(), momentum, cfg.lr, cfg.weight_decay, cfg.muon)
    for n in hidden:
        moved = (ref[n][0] - twin.get_parameter(n).double()).abs().max()  # the twin's matrices never moved
        ulp = torch.finfo(torch.float32).eps * names[n].abs().max().item()
        assert moved > 1e4 * ulp, n
        assert (names[n].double() - ref[n][0]).abs().max() <= 4 * ulp, n
    for n, p in names.items():
        if n not in hidden:
            assert torch.equal(p, twin.get_parameter(n)), n


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon arrived in torch 2.9")
@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
def test_a_matrix_in_bf16_is_torch_muon_to_the_bit(adjust):
    torch.manual_seed(1)
    ours, theirs = (nn.ParameterList([nn.Parameter(torch.randn(24, 10)), nn.Parameter(torch.randn(10, 24))])
                    for _ in range(2))
    theirs.load_state_dict(ours.state_dict())
    mine = build_optimizer(_Holder(ours), optim_cfg(lr_adjust=adjust, ns_dtype="bf16"))
    torch_muon = torch.optim.Muon(theirs.parameters(), lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        mine.step()
        torch_muon.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


class _Holder(nn.Module):
    def __init__(self, params: nn.ParameterList):
        super().__init__()
        self.params = params


def test_orthogonalise_gives_singular_values_near_one():
    """What the iteration is for: whatever the gradient's scale and conditioning, the update's singular
    values land in Jordan's band (~0.7..1.2), for each matrix of a stack alike."""
    torch.manual_seed(2)
    g = torch.randn(4, 32, 20) * torch.logspace(-3, 2, 4).view(4, 1, 1)
    g[1] = g[1] @ torch.diag(torch.logspace(-2, 0, 20))  # ill-conditioned
    s = torch.linalg.svdvals(orthogonalise(g, 5, torch.float32).double())
    assert s.min() > 0.6 and s.max() < 1.25


def test_lr_scale_and_ns_dtype():
    assert lr_scale(torch.Size([64, 256]), "match_rms_adamw") == pytest.approx(0.2 * 16)
    assert lr_scale(torch.Size([4, 256, 64]), "original") == 2.0  # per expert matrix, tall
    assert lr_scale(torch.Size([64, 256]), "original") == 1.0
    assert resolve_ns_dtype("fp32", torch.device("cpu")) == torch.float32
    assert resolve_ns_dtype("bf16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(ffn):
    """Attention, FFN (SDD V, experts, router) to Muon; embedding, head, norm gains and SDD alphas to
    AdamW, the head with the matrices' weight decay; every parameter once."""
    from sdd_train.config import MoEConfig

    extra = {"ffn": "moe", "moe": MoEConfig(n_experts=4, top_k=2, expert_hidden=16)} if ffn == "moe" else {}
    model = Transformer(small_model_cfg("sdd", tie_embeddings=False, **extra))
    groups = {g["name"]: g for g in param_groups(model, optim_cfg(lr_multiplier=2.0))}
    assert [n for n, g in groups.items() if g["muon"]] == ["matrices"]
    assert groups["matrices"]["lr_scale"] == 2.0 and groups["head"]["lr_scale"] == 1.0
    assert groups["head"]["params"] == [model.lm_head.weight] and groups["head"]["weight_decay"] == 0.1
    assert groups["embeddings"]["params"] == [model.embed.weight]
    muon = {id(p) for p in groups["matrices"]["params"]}
    for name, p in model.named_parameters():
        hidden = p.ndim >= 2 and not name.endswith("alpha") and p is not model.embed.weight \
            and p is not model.lm_head.weight
        assert (id(p) in muon) == hidden, name
    if ffn == "moe":
        assert any(p.ndim == 3 for p in groups["matrices"]["params"])
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == model.param_counts().total


def test_a_model_learns_with_muon(tmp_path, data_cache):
    assert main(small_run(tmp_path, data_cache, "optim.name=muon", "model.block=sdd", "train.max_steps=30",
                          "train.precision=fp32", "train.eval_interval=0")) == 0
    loss = {r["step"]: r["loss"] for r in read_records(tmp_path / "metrics.jsonl") if "loss" in r}
    assert sum(loss[s] for s in range(26, 31)) / 5 < loss[1] - 1.0


def test_bad_muon_settings_fail_at_load():
    from sdd_train.config import ConfigError

    from conftest import TINY

    with pytest.raises(ConfigError, match="optim.muon.momentum"):
        load_config(TINY, ["optim.name=muon", "optim.muon.momentum=1.0"])
    with pytest.raises(ConfigError, match="optim.muon.ns_dtype"):
        load_config(TINY, ["optim.muon.ns_dtype=fp16"])


def test_dry_run_says_what_each_rule_updates(capsys):
    from conftest import TINY

    assert main(["--dry-run", TINY, "optim.name=muon", "model.tie_embeddings=false"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("optimizer:"))
    assert line.startswith("optimizer: muon on matrices (") and "adamw on head (2,097,152), gains" in line, line
