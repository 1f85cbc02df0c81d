"""Mixture-of-Experts feed-forward: dropless token-choice routing over SwiGLU (or SDD) experts.

Every token picks its top-k experts from a softmax over all of them; the (token, expert) pairs
are sorted by expert, each expert multiplies its contiguous block of rows in one grouped GEMM
(``torch._grouped_mm``, or a loop over experts where that does not run), and the results are
scattered back weighted by the router probability. No token is ever dropped.

The layer keeps its auxiliary losses and expert load of the last forward in ``self.aux`` and
``self.load`` for the trainer to collect (see :meth:`Transformer.moe_aux`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sdd_train.config import ModelConfig
from sdd_train.model.layers import upcast


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs on these operands: CUDA sm90+ in bf16, or CPU from torch 2.9
    on (2.8 has the op but no CPU kernel); 16-byte rows."""
    if not hasattr(torch, "_grouped_mm") or any(d % 8 for d in (*a.shape[1:], *b.shape[1:])):
        return False
    if a.is_cuda:
        return a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (9, 0)
    return torch.__version__ >= (2, 9) and a.dtype in (torch.float32, torch.bfloat16)


# The expert GEMMs are custom ops: opaque to torch.compile (their per-expert row counts are data),
# so a block with an MoE still compiles as one graph, and the kernel choice stays ours.


@torch.library.custom_op("sdd_train::expert_mm", mutates_args=())
def expert_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, use_grouped: bool) -> torch.Tensor:
    """Rows of ``x`` [N, in], sorted by expert with ``counts`` [E] rows each, times ``w[e]`` [in, out]."""
    if use_grouped and _grouped_mm_ok(x, w):
        return torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))
    pieces = [p @ w[e] for e, p in enumerate(x.split(counts.tolist()))]
    return torch.cat(pieces) if pieces else x.new_zeros(0, w.shape[-1])


@expert_mm.register_fake
def _(x, w, counts, use_grouped):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("sdd_train::expert_mm_wgrad", mutates_args=())
def expert_mm_wgrad(x: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor, use_grouped: bool) -> torch.Tensor:
    """Per expert ``x_e^T @ grad_e``: the [E, in, out] weight gradient of :func:`expert_mm`."""
    if use_grouped and x.is_cuda and _grouped_mm_ok(x, grad):
        return torch._grouped_mm(x.t(), grad, offs=counts.cumsum(0).to(torch.int32))
    sizes = counts.tolist()
    return torch.stack([a.t() @ g for a, g in zip(x.split(sizes), grad.split(sizes))])


@expert_mm_wgrad.register_fake
def _(x, grad, counts, use_grouped):
    return x.new_empty(counts.shape[0], x.shape[1], grad.shape[1])


def _setup(ctx, inputs, output) -> None:
    x, w, counts, use_grouped = inputs
    ctx.save_for_backward(x, w, counts)
    ctx.use_grouped = use_grouped


def _backward(ctx, grad):
    x, w, counts = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = expert_mm(grad, w.transpose(1, 2).contiguous(), counts, ctx.use_grouped)
    grad_w = expert_mm_wgrad(x, grad, counts, ctx.use_grouped)
    return grad_x, grad_w, None, None


expert_mm.register_autograd(_backward, setup_context=_setup)


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

    def forward(self, x: torch.Tensor, counts: torch.Tensor, row_expert: torch.Tensor) -> torch.Tensor:
        """x [N, in] sorted by expert, counts [E] rows per expert, row_expert [N] -> [N, out]."""
        dtype = _compute_dtype(x)
        w = self.weight.to(dtype).transpose(1, 2).contiguous()  # [E, in, out]
        y = expert_mm(x.to(dtype).contiguous(), w, counts, self.grouped_mm == "auto")
        if self.alpha is None:
            return y
        yf = upcast(y).unflatten(-1, (self.norm_groups, -1))
        normed = F.rms_norm(yf, (yf.shape[-1],), eps=self.eps).flatten(-2)
        gain = self.alpha[row_expert].to(normed.dtype)
        if self.gain_scale != 1.0:
            gain = gain * self.gain_scale
        return (normed * gain).to(y.dtype)

    def extra_repr(self) -> str:
        e, o, i = self.weight.shape
        return f"experts={e}, in={i}, out={o}, sdd={self.alpha is not None}"


class MoE(nn.Module):
    """Router + experts. ``ff_proj``/``ff_out`` hold every expert's up+gate and down projections."""

    def __init__(self, cfg: ModelConfig, sdd: bool):
        super().__init__()
        m = cfg.moe
        self.n_experts, self.top_k, self.renormalize = m.n_experts, m.top_k, m.renormalize
        self.router = nn.Linear(cfg.d_model, m.n_experts, bias=False)
        # SDD experts normalise the two branches separately (SPEC section 6: g1*rms(xW1), g2*rms(xV1)).
        self.ff_proj = GroupedLinear(m.n_experts, cfg.d_model, 2 * m.expert_hidden, sdd, cfg.norm_eps,
                                     norm_groups=2, grouped_mm=m.grouped_mm)
        self.ff_out = GroupedLinear(m.n_experts, m.expert_hidden, cfg.d_model, sdd, cfg.norm_eps,
                                    grouped_mm=m.grouped_mm, gain_scale=m.sdd_out_gain_scale)
        self.aux: dict[str, torch.Tensor] = {}
        self.load: torch.Tensor | None = None

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits [T, E] in fp32 or wider, combine weights [T, k], expert ids [T, k])."""
        logits = upcast(F.linear(flat, self.router.weight.to(flat.dtype)))  # fp32 at least
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, weights, experts = self.route(flat)
        flat_experts = experts.reshape(-1)  # [T * k]: pair p is token p // k
        order = flat_experts.argsort(stable=True)
        token = order // self.top_k
        row_expert = flat_experts[order]
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device)
        counts = counts.scatter_add(0, flat_experts, torch.ones_like(flat_experts))
        up, gate = self.ff_proj(flat[token], counts, row_expert).chunk(2, dim=-1)
        y = self.ff_out(F.silu(gate) * up, counts, row_expert)
        y = y * weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
        out = torch.zeros_like(flat).index_add(0, token, y.to(flat.dtype))
        self._record(logits, counts)
        return out.view(shape)

    def _record(self, logits: torch.Tensor, counts: torch.Tensor) -> None:
        """Auxiliary losses (SPEC section 6) and the expert load of this forward."""
        tokens = logits.shape[0]
        probs = logits.softmax(dim=-1)
        lb = self.n_experts / (self.top_k * tokens) * (counts.to(probs.dtype) * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        self.aux = {"lb_loss": lb, "router_z_loss": z}
        self.load = counts.detach()


def load_stats(counts: torch.Tensor) -> dict[str, float]:
    """Min/max tokens per expert and the entropy of the load (1 = perfectly balanced), from summed counts."""
    total = counts.sum().clamp(min=1)
    share = counts.double() / total
    entropy = -(share * share.clamp(min=1e-30).log()).sum().item() / math.log(len(counts))
    return {"load_min": int(counts.min()), "load_max": int(counts.max()), "load_entropy": entropy}
