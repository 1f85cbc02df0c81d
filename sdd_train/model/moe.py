"""Mixture-of-Experts feed-forward: dropless token-choice routing over SwiGLU (or SDD) experts.

Every token picks its top-k experts from a softmax over all of them; the (token, expert) pairs
are sorted by expert, each expert multiplies its contiguous block of rows in one grouped GEMM
(``torch._grouped_mm``, or a loop over experts where that does not run), and the results are
scattered back weighted by the router probability. No token is ever dropped.

``forward`` returns the output and what routing produced (:class:`MoEAux`: the auxiliary losses
and the expert load), which blocks hand up to :meth:`Transformer.forward`: no module state is written
in a forward, so the layer runs under activation checkpointing and compile alike.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sdd_train.config import ModelConfig
from sdd_train.kernels import autocast_dtype, expert_counts, expert_mm, row_gain_rms_norm, upcast


class GroupedLinear(nn.Module):
    """``n_experts`` independent linear maps applied to rows sorted by expert.

    ``weight`` is [E, out, in] (each expert like an ``nn.Linear``). With ``sdd=True`` each output
    row is RMS-normalised (within ``norm_groups`` chunks) and scaled by its expert's ``alpha`` [E, out]
    times the constant ``gain_scale``: the SDD layer per expert.
    """

    def __init__(self, n_experts: int, in_features: int, out_features: int, sdd: bool, eps: float,
                 norm_groups: int = 1, grouped_mm: str = "auto", gain_scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))
        self.alpha = nn.Parameter(torch.ones(n_experts, out_features)) if sdd else None
        self.eps, self.norm_groups, self.grouped_mm, self.gain_scale = eps, norm_groups, grouped_mm, gain_scale

    def forward(self, x: torch.Tensor, counts: torch.Tensor, row_expert: torch.Tensor,
                weight: torch.Tensor | None = None, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, in] sorted by expert, counts [E] rows per expert, row_expert [N] -> [N, out]. ``weight`` and
        ``alpha`` stand in for the module's own (expert parallelism hands in the rank's experts)."""
        weight = self.weight if weight is None else weight
        alpha = self.alpha if alpha is None else alpha
        dtype = autocast_dtype(x)  # the expert weights as a transposed view [E, in, out], never copied in fp32
        y = expert_mm(x.to(dtype).contiguous(), weight.to(dtype).transpose(1, 2), counts, self.grouped_mm == "auto")
        if alpha is None:
            return y
        gain = alpha[row_expert]
        if self.gain_scale != 1.0:
            gain = gain * self.gain_scale
        return row_gain_rms_norm(y, gain, self.eps, self.norm_groups)

    def extra_repr(self) -> str:
        e, o, i = self.weight.shape
        return f"experts={e}, in={i}, out={o}, sdd={self.alpha is not None}"


class MoEAux(NamedTuple):
    """What one MoE forward routed: the load-balancing loss and router z-loss (SPEC section 6), the
    (token, expert) pairs each expert received [E], and the RMS of the router's logits, its scale (the
    last two without gradient). The loss's two factors ride along for a loss over more than this forward
    (:func:`step_balance_loss`): ``balance_counts`` [G, E] the pair counts f it used (without gradient; every
    rank's under ``all_ranks`` / ``global_batch``) and ``mean_probs`` [G, E] this rank's mean distribution P,
    for each of its G groups (sequences under ``sequence``, else one)."""

    lb_loss: torch.Tensor
    router_z_loss: torch.Tensor
    load: torch.Tensor
    logit_rms: torch.Tensor
    balance_counts: torch.Tensor
    mean_probs: torch.Tensor


def balance_loss(n_experts: int, counts: torch.Tensor, mean_probs: torch.Tensor) -> torch.Tensor:
    """E / (pairs) sum_e f_e P_e per group, averaged over the groups (rows of ``counts`` and ``mean_probs``);
    pairs = sum_e f_e, which is k x tokens when f counts the tokens P averages."""
    return (n_experts / counts.sum(-1) * (counts * mean_probs).sum(-1)).mean()


def step_balance_loss(aux: MoEAux, earlier_counts: torch.Tensor) -> torch.Tensor:
    """``lb_loss_scope=global_batch``: the loss of this micro-batch with f counted over every rank's pairs in
    the step so far, ``earlier_counts`` [E] (the earlier micro-batches') plus this one's; P stays this
    micro-batch's. The step's last micro-batch counts the global batch, as Megatron-LM's global aux loss."""
    n_experts = aux.balance_counts.shape[-1]
    return balance_loss(n_experts, aux.balance_counts + earlier_counts.to(aux.balance_counts.dtype), aux.mean_probs)


class ExpertParams(NamedTuple):
    """Every expert's weights (and SDD gains, or None), stacked on a leading expert dimension."""

    proj_weight: torch.Tensor  # [E, 2 * hidden, d]: up and gate
    proj_alpha: torch.Tensor | None
    out_weight: torch.Tensor  # [E, d, hidden]
    out_alpha: torch.Tensor | None


class MoE(nn.Module):
    """Router + experts. ``ff_proj``/``ff_out`` hold every expert's up+gate and down projections."""

    def __init__(self, cfg: ModelConfig, sdd: bool):
        super().__init__()
        m = cfg.moe
        self.n_experts, self.top_k, self.renormalize, self.gating = m.n_experts, m.top_k, m.renormalize, m.gating
        self.lb_loss_scope = m.lb_loss_scope
        self.router = nn.Linear(cfg.d_model, m.n_experts, bias=False)
        # auxiliary-loss-free balancing: a selection bias per expert, moved by ``balance`` between steps
        self.register_buffer("expert_bias", torch.zeros(m.n_experts) if m.bias_update_rate > 0 else None)
        # SDD experts normalise the two branches separately (SPEC section 6: g1*rms(xW1), g2*rms(xV1)).
        self.ff_proj = GroupedLinear(m.n_experts, cfg.d_model, 2 * m.expert_hidden, sdd, cfg.norm_eps,
                                     norm_groups=2, grouped_mm=m.grouped_mm)
        self.ff_out = GroupedLinear(m.n_experts, m.expert_hidden, cfg.d_model, sdd, cfg.norm_eps,
                                    grouped_mm=m.grouped_mm, gain_scale=m.sdd_out_gain_scale)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits [T, E] in fp32 or wider, the per-token expert distribution the load-balancing
        loss uses [T, E], combine weights [T, k], expert ids [T, k])."""
        logits = upcast(F.linear(flat, self.router.weight.to(flat.dtype)))  # fp32 at least
        scores = logits.softmax(dim=-1) if self.gating == "softmax" else logits.sigmoid()
        if self.expert_bias is None:
            weights, experts = scores.topk(self.top_k, dim=-1)
        else:  # the bias chooses, the scores weigh
            experts = (scores + self.expert_bias.to(scores.dtype)).topk(self.top_k, dim=-1).indices
            weights = scores.gather(-1, experts)
        if self.renormalize or self.gating == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        probs = scores if self.gating == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
        return logits, probs, weights, experts

    @torch.no_grad()
    def balance(self, load: torch.Tensor, rate: float) -> None:
        """Move the selection bias by ``rate`` towards the mean load: up for an expert that received fewer
        (token, expert) pairs than the mean in the step just taken, down for one that received more."""
        load = load.to(self.expert_bias.dtype)
        self.expert_bias.add_(torch.sign(load.mean() - load), alpha=rate)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, probs, weights, experts = self.route(flat)
        flat_experts = experts.reshape(-1)  # [T * k]: pair p is token p // k
        order = flat_experts.argsort(stable=True)
        token = order // self.top_k
        row_expert = flat_experts[order]
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device)
        counts = counts.scatter_add(0, flat_experts, torch.ones_like(flat_experts))
        y = self.run_experts(flat[token], counts, row_expert)
        y = y * weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
        out = torch.zeros_like(flat).index_add(0, token, y.to(flat.dtype))
        sequences = shape[0] if self.lb_loss_scope == "sequence" and len(shape) == 3 else 1
        return out.view(shape), self.aux_losses(logits, probs, counts, experts, sequences)

    def run_experts(self, rows: torch.Tensor, counts: torch.Tensor, row_expert: torch.Tensor,
                    params: ExpertParams | None = None) -> torch.Tensor:
        """The experts' SwiGLU on ``rows`` sorted by expert (``counts`` [E] each, ``row_expert`` [N]), with
        ``params`` in place of the layer's own (sdd_train/distributed/expert_parallel.py replaces this
        method with one that sends each row to the rank holding its expert and runs this there)."""
        p = params or self.expert_params()
        # the counts where the layer's expert GEMMs read them (one host copy for all four where they loop)
        dims = (*p.proj_weight.shape[1:], *p.out_weight.shape[1:])
        gemm_counts = expert_counts(counts, autocast_dtype(rows), dims, self.ff_proj.grouped_mm == "auto")
        up, gate = self.ff_proj(rows, gemm_counts, row_expert, p.proj_weight, p.proj_alpha).chunk(2, dim=-1)
        return self.ff_out(F.silu(gate) * up, gemm_counts, row_expert, p.out_weight, p.out_alpha)

    def expert_params(self) -> ExpertParams:
        return ExpertParams(self.ff_proj.weight, self.ff_proj.alpha, self.ff_out.weight, self.ff_out.alpha)

    def all_ranks_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """The pair counts of this micro-batch summed over every rank's (``lb_loss_scope`` all_ranks or
        global_batch): one process is all ranks; sdd_train/distributed/parallelize.py replaces this with an
        all-reduce."""
        return counts

    def aux_losses(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor, experts: torch.Tensor,
                   sequences: int = 1) -> MoEAux:
        """Auxiliary losses (SPEC section 6) and the expert load of this forward. The load-balancing
        loss E / (k T) sum_e f_e P_e is taken over ``sequences`` equal groups of the T tokens (each
        with its own pair counts f and mean distribution P) and averaged; one group: the whole batch.
        Under ``all_ranks`` and ``global_batch`` f and T are every rank's (P stays this rank's: the ranks' mean
        of the loss, which their gradient mean takes, is the loss of the micro-batches together);
        :func:`step_balance_loss` adds the step's earlier micro-batches under ``global_batch``."""
        tokens = logits.shape[0] // sequences
        if sequences > 1:
            chosen = experts.reshape(sequences, -1)
            f = torch.zeros(sequences, self.n_experts, dtype=probs.dtype, device=probs.device)
            f = f.scatter_add(1, chosen, torch.ones_like(chosen, dtype=probs.dtype))
        elif self.lb_loss_scope in ("all_ranks", "global_batch"):
            f = self.all_ranks_counts(counts).to(probs.dtype)[None]
        else:
            f = counts.to(probs.dtype)[None]
        mean_probs = probs.reshape(sequences, tokens, -1).mean(dim=1)
        lb = balance_loss(self.n_experts, f, mean_probs)
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return MoEAux(lb, z, counts.detach(), logits.detach().float().pow(2).mean().sqrt(), f.detach(), mean_probs)

