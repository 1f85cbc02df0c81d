"""µP, the maximal-update parametrization (``model.parametrization=mup``; Yang et al. 2022, "Tensor
Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer"), for Adam.

With the width multiplier ``m = d_model / mup_base_width`` (the base model has the same heads, so
head_dim grows with m too):

- hidden matrices (attention, FFN, SDD ``V``, experts, router): init std sigma_base / sqrt(m), Adam
  learning rate lr / m (Muon: :func:`hidden_lr_scale`). Their fan-in grows with m, so an update of
  fixed per-entry size would move their outputs m times as much; the router counts as hidden (fan-in
  d) rather than as a readout;
- the embedding (its fan-in, the vocabulary, does not grow): init std sigma_base, learning rate lr;
- norm gains and SDD ``alpha``s (vectors, one entry per feature): as in SP. Under SDD the ``alpha``s
  carry each feature's scale and ``V`` only its direction (RMSNorm(V x) is invariant to V's scale),
  so the width rules reach SDD's scales only through the vectors, which need none;
- the LM head: learning rate lr, logits multiplied by 1 / m (the ``mup`` package's MuReadout): its
  fan-in grows, its fan-out does not. An untied head starts as the base model's, std
  1 / sqrt(base width), as MuReadout's rescaled default init; a tied one is the embedding. A zero head
  (Yang et al., appendix D.2, optional there) trained ~0.7 nats worse in our transfer sweep at every
  width under Adam, the base width included (docs/results.md, "µP");
- attention: softmax scale sqrt(base_head_dim) / head_dim instead of 1 / sqrt(head_dim), µP's
  1 / head_dim with the constant that makes it SP's at the base width. Applied as a factor on q, so
  every attention kernel (flash-attn, FlexAttention, SDPA, the CPU kernel, a KV cache) runs as is.

sigma_base is ``model.init.std`` (times its multipliers), or OLMo2's 1 / sqrt(2.5 d) at the base
width. At m = 1 every rule is SP's: a µP model at its base width is the SP model to the bit
(tests/test_mup.py).
"""

from __future__ import annotations

import math

from sdd_train.config import ModelConfig


def width_mult(cfg: ModelConfig) -> float:
    """d_model over the base width under µP, 1 under SP."""
    return cfg.d_model / cfg.mup_base_width if cfg.parametrization == "mup" else 1.0


def init_stds(cfg: ModelConfig) -> tuple[float, float]:
    """The base init std of the hidden matrices and of the embedding (before a scheme's own factors)."""
    init, m = cfg.init, width_mult(cfg)
    base_width = cfg.d_model / m
    sigma_base = (init.std if init.std is not None else 1.0 / math.sqrt(2.5 * base_width)) * init.std_multiplier
    if cfg.parametrization != "mup":
        return sigma_base, sigma_base
    return sigma_base / math.sqrt(m), sigma_base


def query_scale(cfg: ModelConfig) -> float:
    """The factor on q that turns SDPA's 1/sqrt(head_dim) into µP's sqrt(base_head_dim) / head_dim."""
    return 1.0 / math.sqrt(width_mult(cfg))


def logit_scale(cfg: ModelConfig) -> float:
    """The factor on the LM head's logits (its input, equivalently)."""
    return 1.0 / width_mult(cfg)


def hidden_lr_scale(cfg: ModelConfig, muon_lr_adjust: str | None = None) -> float:
    """The factor on the hidden matrices' learning rate: 1 / m for Adam, whose near-sign updates of a
    [d, d] matrix have a spectral norm ~ lr d. A Muon update is orthogonal, spectral norm ~ its scale:
    Jordan's ``original`` scale, sqrt(max(1, A/B)), already holds it at what µP asks (the spectral
    condition, Yang et al. 2023); ``match_rms_adamw``'s 0.2 sqrt(max(A, B)) grows as sqrt(m), so 1 / sqrt(m)."""
    m = width_mult(cfg)
    if muon_lr_adjust is None:
        return 1.0 / m
    return 1.0 / math.sqrt(m) if muon_lr_adjust == "match_rms_adamw" else 1.0
