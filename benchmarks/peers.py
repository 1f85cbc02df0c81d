"""What our users would pick instead, built at our model config's shape for benchmarks/step_time.py:
transformers' Olmo2ForCausalLM, OLMo-core's Llama-like transformer and torchtitan's Llama 3.

Each builder returns a module whose ``forward(tokens, targets)`` returns the mean next-token loss the
way that framework's users compute it, compiled (``compiled=True``) the way that framework compiles
it. The frameworks are imported inside the builders, so this file imports without them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from sdd_train.config.schema import ModelConfig


def olmo2(m: ModelConfig, seq_len: int, device: torch.device, compiled: bool) -> nn.Module:
    """transformers' Olmo2ForCausalLM (OLMo2 is our ``reordered`` scheme): its own loss (``labels``: fp32
    logits, then cross-entropy); compiled: each decoder layer's forward, transformers' compile target."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    hf = Olmo2ForCausalLM(Olmo2Config(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_hidden, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings, pad_token_id=None, eos_token_id=None,
        use_cache=False)).to(device)
    if compiled:
        for layer in hf.model.layers:
            layer.forward = torch.compile(layer.forward)
    forward = hf.forward
    # shift_labels: the targets are already shifted (labels only switches the loss on)
    hf.forward = lambda tokens, targets: forward(input_ids=tokens, labels=targets, shift_labels=targets,
                                                 use_cache=False).loss
    return hf


def olmo_core(m: ModelConfig, seq_len: int, device: torch.device, compiled: bool) -> nn.Module:
    """OLMo-core's ``TransformerConfig.llama_like`` as shipped (pre-norm, QK-norm over all q / k features
    like our ``pre``, its default attention backend: PyTorch SDPA), our FFN width instead of its rounded
    8/3 d; its LM head's default loss (logits, then cross-entropy); compiled: its ``apply_compile``."""
    from olmo_core.nn.feed_forward import FeedForwardConfig
    from olmo_core.nn.transformer import TransformerConfig

    config = TransformerConfig.llama_like(
        d_model=m.d_model, vocab_size=m.vocab_size, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
        qk_norm=True, layer_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
        feed_forward=FeedForwardConfig(hidden_size=m.ffn_hidden, bias=False))
    model = config.build(init_device=device.type)
    model.init_weights(max_seq_len=seq_len, device=device)
    if compiled:
        model.apply_compile()
    forward = model.forward
    model.forward = lambda tokens, targets: forward(tokens, labels=targets).loss
    return model


def torchtitan(m: ModelConfig, seq_len: int, device: torch.device, compiled: bool) -> nn.Module:
    """torchtitan's Llama 3 (its 1B flavour's layer factory and inits, no QK-norm) at our shape; its loss
    (fp32 cross-entropy summed, divided by the token count); compiled: its ``apply_compile`` (each block,
    fullgraph) and the compiled loss, its default compile components.

    Changed to run on CPU: every layer's inner attention is torchtitan's maskless causal
    ``ScaledDotProductAttention`` instead of its default FlexAttention (neither flex nor varlen has a
    CPU backward); exact when each row is one document, as in this benchmark. On CUDA nothing is
    changed: FlexAttention with the block-causal mask its trainer builds from the positions.
    """
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.config import CompileConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.compile import apply_compile
    from torchtitan.models import llama3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention

    layers = llama3._build_llama3_layers(
        n_layers=m.n_layers, dim=m.d_model, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, hidden_dim=m.ffn_hidden,
        rope=ComplexRoPE.Config(dim=m.head_dim, max_seq_len=seq_len, theta=m.rope_theta), attn_backend="flex")
    for layer in layers:
        layer.attention_norm = dataclasses.replace(layer.attention_norm, eps=m.norm_eps)
        layer.ffn_norm = dataclasses.replace(layer.ffn_norm, eps=m.norm_eps)
        if device.type != "cuda":
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    d, vocab = m.d_model, m.vocab_size
    embedding_init = llama3._EMBEDDING_SKIP_INIT if m.tie_embeddings else llama3._EMBEDDING_INIT
    config = llama3.Llama3Model.Config(
        dim=d, vocab_size=vocab, enable_weight_tying=m.tie_embeddings,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=d, param_init=embedding_init),
        norm=RMSNorm.Config(normalized_shape=d, eps=m.norm_eps, param_init=llama3._NORM_INIT),
        lm_head=Linear.Config(in_features=d, out_features=vocab, param_init=llama3._output_linear_init(d)),
        layers=layers)
    with torch.device(device):
        model = config.build()
        model.init_states(buffer_device=device)
    loss = cross_entropy_loss
    if compiled:
        apply_compile(model, compile_config=CompileConfig(enable=True),
                      parallel_dims=ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, world_size=1))
        loss = torch.compile(cross_entropy_loss)
    forward = model.forward

    def step_loss(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        masks = None
        if device.type == "cuda":  # one document per row: positions 0..L-1 in every row
            masks = model.get_attention_masks(torch.arange(tokens.shape[1], device=device).expand_as(tokens))
        return loss(forward(tokens, attention_masks=masks), targets) / targets.numel()

    model.forward = step_loss
    return model


@dataclass(frozen=True)
class Peer:
    """One framework's model: the ``--peers`` name, the package it needs and how to install it."""

    name: str
    package: str
    install: str
    build: Callable[[ModelConfig, int, torch.device, bool], nn.Module]

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


PEERS = {p.name: p for p in (
    Peer("hf-olmo2", "transformers", "pip install transformers", olmo2),
    Peer("olmo-core", "olmo_core", "make bench-peers, or pip install -e '.[peers]' beside a pinned torch", olmo_core),
    Peer("torchtitan", "torchtitan", "make bench-peers, or pip install -e '.[peers]' beside a pinned torch",
         torchtitan),
)}
