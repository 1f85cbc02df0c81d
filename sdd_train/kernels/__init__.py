"""Kernel selection, in one place: model code calls these plain functions, and each decides here
which implementation runs.

=======================  ==================================================================
``rms_norm``             Triton (CUDA, eager) | C (CPU, eager) | PyTorch (compiled, elsewhere)
``row_gain_rms_norm``    PyTorch (the MoE's per-expert SDD gains)
``l2_normalize``         PyTorch (nGPT's unit-sphere projection)
``sdd_swiglu``           C custom op (CPU, eager and compiled) | ``rms_norm`` + SiLU
``causal_attention``     flash-attn (CUDA, half precision) | FlexAttention (CUDA, document masks)
                         | CPU batched matmuls (short, unmasked) | PyTorch SDPA
``expert_mm``            ``torch._grouped_mm`` (every CUDA GPU and CPU from torch 2.9) | a loop
``linear_cross_entropy`` chunked head + loss, its softmax gradient compiled with the model or eager
=======================  ==================================================================

Every function has a PyTorch path that needs nothing but torch (what a Hugging Face export runs).
``SDD_TRAIN_NORM_KERNEL=torch`` sends the norms and the SDD SwiGLU to it everywhere; the variable is
read once, at the first norm (:func:`set_norm_kernel` changes the setting afterwards).
"""

from sdd_train.kernels.attention import (AttentionMask, BackendUnavailable, DocumentSpans, attention_backend_problem,
                                         attention_mask, causal_attention, document_mask, document_spans,
                                         flash_attn_usable, sdpa_causal_attention)
from sdd_train.kernels.cross_entropy import linear_cross_entropy, lm_loss
from sdd_train.kernels.grouped_mm import expert_counts, expert_mm
from sdd_train.kernels.norm import l2_normalize, rms_norm, rms_norm_torch, row_gain_rms_norm
from sdd_train.kernels.precision import (autocast, autocast_dtype, compute_dtype, slow_bf16_matmuls, sum_of_squares,
                                         sums_of_squares, upcast)
from sdd_train.kernels.settings import norm_kernel, set_norm_kernel
from sdd_train.kernels.swiglu import sdd_swiglu

__all__ = ["AttentionMask", "BackendUnavailable", "DocumentSpans", "attention_backend_problem", "attention_mask",
           "autocast", "autocast_dtype", "causal_attention", "compute_dtype", "document_mask", "document_spans",
           "expert_counts", "expert_mm", "flash_attn_usable", "l2_normalize", "linear_cross_entropy", "lm_loss",
           "norm_kernel", "rms_norm", "rms_norm_torch", "row_gain_rms_norm", "sdd_swiglu", "sdpa_causal_attention",
           "set_norm_kernel", "slow_bf16_matmuls", "upcast"]
