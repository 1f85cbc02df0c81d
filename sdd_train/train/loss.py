"""Language-modelling loss: token-mean cross-entropy in fp32, with optional logits z-loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss_weight: float = 0.0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return (total loss, cross-entropy, z-loss or None); z-loss = mean(logsumexp(logits)^2)."""
    logits = logits.float().flatten(0, -2)
    ce = F.cross_entropy(logits, targets.flatten())
    if z_loss_weight <= 0:
        return ce, ce, None
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return ce + z_loss_weight * z, ce, z
