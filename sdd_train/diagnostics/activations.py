"""Activation statistics: residual-stream RMS per layer and layer-wise feature similarity (paper Fig. 9).

The hidden states are captured with forward hooks during an ordinary ``model(tokens)`` call, so
the same code works for a plain, compiled or FSDP2-sharded model (every rank runs the forward on
the same batch and gets the same numbers).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from sdd_train.kernels import autocast


@contextlib.contextmanager
def captured_hidden_states(model: nn.Module):
    """Yields a list that fills with the embedding output and every block's output during a forward."""
    states: list[torch.Tensor] = []

    def keep(module, inputs, output):  # a block returns (stream, what its feed-forward reports)
        states.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [model.embed.register_forward_hook(keep)]
    handles += [block.register_forward_hook(keep) for block in model.blocks]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


def residual_rms(states: list[torch.Tensor]) -> list[float]:
    """sqrt(mean(h^2)) of each hidden state over all tokens and features."""
    return [s.float().square().mean().sqrt().item() for s in states]


def similarity_matrix(states: list[torch.Tensor], eps: float = 1e-12) -> torch.Tensor:
    """[n, n] mean over tokens of the cosine similarity between the hidden states of layers i and j.

    ``states`` are [..., d] tensors of one batch; entry (i, j) = mean_t cos(h_i[t], h_j[t]).
    """
    flat = torch.stack([s.float().reshape(-1, s.shape[-1]) for s in states])  # [n, T, d]
    unit = flat / flat.norm(dim=-1, keepdim=True).clamp_min(eps)
    rows = unit.reshape(len(states), -1)  # sum over (t, d) of products = sum over t of cosines
    return rows @ rows.T / unit.shape[1]


@torch.no_grad()
def activation_stats(model: nn.Module, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None,
                     precision: str = "fp32") -> dict:
    """``{"rms": [L+1], "similarity": [[L+1 x L+1]]}`` for one batch (index 0 is the embedding output),
    the forward in the run's ``precision``."""
    was_training = model.training
    model.eval()
    with captured_hidden_states(model) as states, autocast(tokens.device, precision):
        model(tokens, doc_ids)
    model.train(was_training)
    return {"rms": residual_rms(states), "similarity": similarity_matrix(states).tolist()}
