"""Activation checkpointing and compile applied to a plain model, as it describes itself (its parallel plan),
change nothing but memory and speed."""

from __future__ import annotations

import pytest
import torch

from conftest import small_model_cfg
from sdd_train.config import MoEConfig, ParallelConfig
from sdd_train.model import LossOutput, Transformer
from sdd_train.distributed.world import World
from sdd_train.distributed.parallelize import apply_checkpointing_and_compile, checkpointed_blocks, parallelize

ONE = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def loss_and_grads(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss (the fused chunked one; under compile its softmax kernel is compiled too) and gradients;
    an MoE's expert load rides along as the gradient of ``expert_load``."""
    model.zero_grad()
    out = model(tokens[:, :-1], targets=tokens[:, 1:], z_loss=1e-3)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if out.expert_load is not None:
        grads["expert_load"] = out.expert_load.float()
    return out.loss.detach(), grads


def test_checkpointed_block_selection():
    assert checkpointed_blocks(6, "none", 2) == []
    assert checkpointed_blocks(6, "full", 2) == [0, 1, 2, 3, 4, 5]
    assert checkpointed_blocks(6, "every_n", 2) == [0, 2, 4]
    assert checkpointed_blocks(7, "every_n", 3) == [0, 3, 6]
    assert checkpointed_blocks(3, "selective", 2) == [0, 1, 2]


def test_the_transformer_describes_what_to_parallelize():
    model = Transformer(small_model_cfg("sdd", n_layers=3))
    plan = model.parallel_plan()
    assert plan.root is model and list(plan.blocks) == list(model.blocks)
    assert set(plan.compiled_methods) == {"chunked_loss"} and "chunked_loss" not in vars(model)  # nothing applied yet
    assert plan.output_types == (LossOutput,)


@pytest.mark.parametrize("mode,compile,ffn", [("full", False, "dense"), ("every_n", False, "dense"),
                                              ("full", False, "moe"), ("full", True, "moe"),
                                              ("selective", False, "dense"), ("selective", False, "moe")])
def test_activation_checkpointing_gives_identical_gradients(mode, compile, ffn):
    """MoE + AC + compile crashed at the first forward while the MoE wrote its aux losses onto itself.
    Compiled dense blocks under checkpointing (full, every-n, selective): tests/test_matrix.py's compiled AC
    combinations."""
    torch.manual_seed(0)
    moe = MoEConfig(n_experts=4, top_k=2, expert_hidden=16)
    cfg = small_model_cfg("sdd", n_layers=4, ffn=ffn, moe=moe)
    plain, wrapped = Transformer(cfg), Transformer(cfg)
    wrapped.load_state_dict(plain.state_dict())
    par = ParallelConfig(activation_checkpointing=mode, ac_every=2)
    # aot_eager: the crash was dynamo's, and AC's recomputation inside the graph is AOTAutograd's partition;
    # inductor's kernels under AC are tests/test_matrix.py's compiled AC combinations
    chosen = parallelize(wrapped.parallel_plan(), par, ONE.dims, ONE.device, compile, "aot_eager")
    assert chosen == ([0, 2] if mode == "every_n" else [0, 1, 2, 3])
    assert ("chunked_loss" in vars(wrapped)) == compile and "chunked_loss" not in vars(plain)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    ref_loss, ref_grads = loss_and_grads(plain, tokens)
    loss, grads = loss_and_grads(wrapped, tokens)
    assert set(wrapped.state_dict()) == set(plain.state_dict())  # checkpoints stay interchangeable
    if compile:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        if ffn == "moe":  # compiled routing sends every token where eager routing does
            assert torch.equal(grads["expert_load"], ref_grads["expert_load"])
        for n in ref_grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6 * ref_grads[n].abs().max().item(),
                                       msg=n)
    else:  # recomputation repeats the same kernels: bitwise equal
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)


def test_activation_checkpointing_recomputes_forward():
    """The wrapped blocks really run twice per step (otherwise nothing was checkpointed)."""
    torch.manual_seed(0)
    cfg = small_model_cfg("pre", n_layers=4)
    model = Transformer(cfg)
    calls = []
    for i, block in enumerate(model.blocks):
        block.attention.register_forward_hook(lambda *a, i=i: calls.append(i))
    par = ParallelConfig(activation_checkpointing="every_n", ac_every=2)
    parallelize(model.parallel_plan(), par, ONE.dims, ONE.device, False)
    model(torch.randint(0, cfg.vocab_size, (2, 8))).sum().backward()
    assert sorted(calls) == [0, 0, 1, 2, 2, 3]


@pytest.mark.parametrize("fullgraph", [True, False])
def test_checkpointed_compiled_blocks_keep_no_activations(fullgraph):
    """Checkpointing outside the compiled blocks (the order for graphs that break, as under expert parallelism)
    frees what the compiled forward saves, as checkpointing inside one graph does: what the step keeps for backward outside
    the checkpoints (saved-tensor hooks see it) is a fraction of what the compiled blocks keep without AC."""
    torch.manual_seed(0)
    cfg = small_model_cfg("pre", n_layers=4, ffn="moe", moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16))
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    kept = {}
    for mode in ("none", "full"):
        torch.manual_seed(0)
        model = Transformer(cfg)
        apply_checkpointing_and_compile(model.parallel_plan(), ParallelConfig(activation_checkpointing=mode),
                                        compiled=True, fullgraph=fullgraph, backend="aot_eager")
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.nbytes) or t, lambda t: t):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:]).loss
        loss.backward()
        kept[mode] = sum(sizes)
    assert kept["full"] < kept["none"] / 3, kept


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointed_blocks_whose_graphs_break_recompute_with_the_compiled_graphs(mode):
    """One process, the experts run outside the compiled graphs (as expert parallelism runs its all-to-all):
    activation checkpointing gives bitwise the gradients of the compiled blocks without it, so its
    recomputation ran the forward's graphs (a checkpoint that dynamo ran eagerly recomputed with eager kernels)."""
    cfg = small_model_cfg("pre", n_layers=2, ffn="moe", moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16))
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    grads = {}
    for ac in ("none", mode):
        torch.manual_seed(0)
        model = Transformer(cfg)
        plan = model.parallel_plan()
        for layer in plan.expert_layers:  # a graph break at the experts, as expert_parallel_run's
            layer.run_experts = torch.compiler.disable(type(layer).run_experts.__get__(layer))
        apply_checkpointing_and_compile(plan, ParallelConfig(activation_checkpointing=ac), compiled=True,
                                        fullgraph=False, backend="aot_eager")
        _, grads[ac] = loss_and_grads(model, tokens)
    assert all(torch.equal(grads[mode][n], grads["none"][n]) for n in grads["none"]), mode


def test_compile_defaults_to_on_for_gpus_only():
    from sdd_train.config import TrainConfig
    from sdd_train.distributed.parallelize import compile_enabled

    assert TrainConfig().compile is None
    assert compile_enabled(None, torch.device("cuda")) and not compile_enabled(None, torch.device("cpu"))
    assert compile_enabled(True, torch.device("cpu")) and not compile_enabled(False, torch.device("cuda"))


@pytest.mark.parametrize("block", ["pre", "sdd"])
def test_selective_checkpointing_recomputes_the_cheap_work_and_no_matrix_product(block):
    """The operators a backward runs (a dispatch mode counting them): full recomputation repeats the forward's
    matrix products; selective repeats none of them (their outputs were kept, as under none) but does
    recompute the elementwise work (its multiplications, the norms' and SwiGLU's among them)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    cfg = small_model_cfg(block, n_layers=4)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    counts = {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = Transformer(cfg)
        parallelize(model.parallel_plan(), ParallelConfig(activation_checkpointing=mode), ONE.dims, ONE.device, False)
        loss = model(tokens[:, :-1], targets=tokens[:, 1:]).loss
        with Count() as count:
            loss.backward()
        counts[mode] = count.ops
    matmuls = {m: sum(c.get(op, 0) for op in ("mm", "addmm", "bmm")) for m, c in counts.items()}
    assert matmuls["selective"] == matmuls["none"] < matmuls["full"], matmuls
    assert counts["none"]["mul"] < counts["selective"]["mul"], (counts["none"]["mul"], counts["selective"]["mul"])
