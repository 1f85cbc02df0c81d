"""Causal attention: which implementation runs (flash-attn, FlexAttention, the CPU batched-matmul
kernel, SDPA), and the document masks each takes.

Document masks, per device: flash-attn's varlen kernel takes the documents as spans in half
precision (their number is a dynamic dimension, so a compiled block is traced once for every
document count); any other GPU run gets FlexAttention with a document block mask (a Triton kernel
under compile; SDPA would take a dense mask with GQA only in its math backend, which materialises
every score), unless ``model.attention_backend=sdpa`` asks for SDPA; a CPU takes a dense mask, for
the batched-matmul kernel of :mod:`sdd_train.kernels.cpu_attention` or SDPA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sdd_train.exit_codes import UsageError
from sdd_train.kernels.cpu_attention import cpu_attention_usable, cpu_causal_attention

try:  # optional: pip install flash-attn (GPU only)
    from flash_attn import flash_attn_func, flash_attn_varlen_func  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_func = flash_attn_varlen_func = None


# SDPA takes grouped k/v directly from torch 2.5 on (torch.__version__ compares with (major, minor)).
SDPA_HAS_GQA = torch.__version__ >= (2, 5)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] document ids -> [B, 1, S, S] boolean mask: causal and within the same document."""
    s = doc_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids[:, :, None] == doc_ids[:, None, :]).logical_and(causal).unsqueeze(1)


@dataclass(frozen=True)
class DocumentSpans:
    """Packed documents in flash-attn's varlen form: ``cu_seqlens`` [n_docs + 1] int32 offsets of
    the documents in the flattened [B * S] batch (every row starts a new span). ``doc_ids`` is kept
    for the dense-mask fallback of :func:`causal_attention` (spans handed to a run flash-attn cannot
    serve)."""

    cu_seqlens: torch.Tensor
    doc_ids: torch.Tensor


def document_spans(doc_ids: torch.Tensor, device: torch.device | None = None,
                   ids_there: torch.Tensor | None = None) -> DocumentSpans:
    """Document boundaries of [B, S] ``doc_ids``: a span starts at every row start and id change.

    The spans are found where ``doc_ids`` is and then moved to ``device`` (default: the same;
    ``ids_there``: the ids already copied there): their number is read on the host (a shape), which
    from a GPU's ids waits for the GPU, and from the data feed's host copy waits for nothing. It varies
    from batch to batch: it is marked dynamic for torch.compile, so the blocks that take it are traced
    once for all counts instead of once per count (fullgraph compile stops at the eighth recompile)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    offsets = starts.flatten().nonzero().flatten()
    end = torch.tensor([doc_ids.numel()], device=doc_ids.device)
    device = doc_ids.device if device is None else torch.device(device)
    cu_seqlens = torch.cat([offsets, end]).to(torch.int32)
    if device.type == "cuda" and not cu_seqlens.is_cuda:
        cu_seqlens = cu_seqlens.pin_memory()  # an asynchronous copy from pageable memory may wait for the stream
    cu_seqlens = cu_seqlens.to(device, non_blocking=True)
    torch._dynamo.mark_dynamic(cu_seqlens, 0)
    return DocumentSpans(cu_seqlens, doc_ids.to(device, non_blocking=True) if ids_there is None else ids_there)


@dataclass(frozen=True)
class DocumentBlockMask:
    """Packed documents as a FlexAttention block mask (causal and within a document); ``doc_ids`` is
    kept for the dense fallback."""

    block_mask: Any  # torch.nn.attention.flex_attention.BlockMask
    doc_ids: torch.Tensor


def document_block_mask(doc_ids: torch.Tensor) -> DocumentBlockMask:
    """The FlexAttention form of the document mask of [B, S] ``doc_ids``."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q, k):
        return (q >= k) & (doc_ids[b, q] == doc_ids[b, k])

    b, s = doc_ids.shape
    return DocumentBlockMask(create_block_mask(same_document_causal, b, None, s, s, device=doc_ids.device), doc_ids)


AttentionMask = torch.Tensor | DocumentSpans | DocumentBlockMask | None
DOCUMENT_MASKS = (DocumentSpans, DocumentBlockMask)  # built from document ids (dense masks are tensors too)


def _on_cuda(where: torch.Tensor | torch.device) -> bool:
    return where.is_cuda if isinstance(where, torch.Tensor) else torch.device(where).type == "cuda"


def flex_attention_usable(where: torch.Tensor | torch.device) -> bool:
    """FlexAttention runs forward and backward on this tensor's device: CUDA (its CPU backward is not
    implemented)."""
    return _on_cuda(where) and _has_flex_attention()


@functools.cache
def _has_flex_attention() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:  # torch < 2.5
        return False
    return True


@functools.cache
def _compiled_flex_attention():
    """FlexAttention compiled once per process: uncompiled, it materialises every score."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentBlockMask,
                            compiled: bool = True) -> torch.Tensor:
    """:func:`causal_attention` of [B, S, H, D] inputs within documents, through FlexAttention (GQA natively)."""
    from torch.nn.attention.flex_attention import flex_attention

    attend = _compiled_flex_attention() if compiled else flex_attention
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = attend(q, k, v, block_mask=mask.block_mask, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


class BackendUnavailable(UsageError, RuntimeError):
    """``model.attention_backend`` names a kernel that this device, precision, input or installation
    cannot run: a usage error (exit 2, one line), and a RuntimeError where it is raised mid-forward."""

    label = "backend error"


def flash_attn_usable(where: torch.Tensor | torch.device) -> bool:
    """flash-attn is installed and this tensor or device is CUDA (it also needs half precision, checked
    per call)."""
    return flash_attn_func is not None and _on_cuda(where)


def attention_backend_problem(backend: str, device: torch.device, precision: str) -> str | None:
    """Why ``model.attention_backend`` cannot run on this device at this precision (None: it can)."""
    if backend != "flash":
        return None
    if flash_attn_func is None:
        return "needs the flash-attn package (pip install -e .[gpu])"
    if device.type != "cuda" or precision != "bf16":
        return f"needs a CUDA device and train.precision=bf16 (this run: {device.type}, {precision})"
    return None


def document_mask_form(backend: str, dtype: torch.dtype, device: torch.device) -> str:
    """The form of document mask the attention kernel that will run takes: ``spans`` for flash-attn
    (CUDA, half precision ``dtype``: the q/k/v dtype), ``block`` for FlexAttention (any other CUDA run
    but ``backend=sdpa``), ``dense`` for SDPA and the CPU kernel."""
    if backend != "sdpa" and flash_attn_usable(device) and dtype in (torch.float16, torch.bfloat16):
        return "spans"
    if backend == "auto" and flex_attention_usable(device):
        return "block"
    return "dense"


def prebuilt_document_mask(host_ids: torch.Tensor, device_ids: torch.Tensor, backend: str,
                           dtype: torch.dtype) -> DocumentSpans | DocumentBlockMask | None:
    """The mask of a batch's ids (on the host, and copied to the device) where its form depends on the
    documents: flash-attn's spans, counted on the host (the data feed's copy: no wait for the device),
    or FlexAttention's block mask; None where the dense mask follows from the ids alone."""
    form = document_mask_form(backend, dtype, device_ids.device)
    if form == "spans":
        return document_spans(host_ids, device_ids.device, device_ids)
    return document_block_mask(device_ids) if form == "block" else None


def attention_mask(doc_ids: AttentionMask, backend: str, dtype: torch.dtype) -> AttentionMask:
    """The document mask of [B, S] ``doc_ids`` in :func:`document_mask_form` for a run on their device,
    or ``doc_ids`` itself where it is such a mask already (the data feed's, built from the host's ids).
    Built once per forward, outside the (compiled) blocks."""
    if doc_ids is None or isinstance(doc_ids, DOCUMENT_MASKS):
        return doc_ids
    built = prebuilt_document_mask(doc_ids, doc_ids, backend, dtype)
    return document_mask(doc_ids) if built is None else built


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
                     mask: AttentionMask = None) -> torch.Tensor:
    """Causal GQA attention on [B, S, H, D] inputs, returning [B, S, H, D].

    ``backend``: 'flash' uses flash-attn (CUDA, half precision), 'sdpa' PyTorch's
    scaled_dot_product_attention, 'auto' flash-attn where it can run, on CPU the batched-matmul
    attention of :mod:`sdd_train.kernels.cpu_attention` for short sequences (with or without a
    dense document mask), else SDPA.
    ``mask``: document spans (flash-attn's varlen kernel; SDPA gets the equivalent dense mask), a
    document block mask (FlexAttention) or a dense boolean mask (from :func:`document_mask` or a KV
    cache), which only SDPA takes. GQA: flash-attn and FlexAttention take fewer k/v heads natively,
    SDPA with ``enable_gqa``.
    """
    flash_ok = (flash_attn_usable(q) and q.dtype in (torch.float16, torch.bfloat16)
                and (mask is None or isinstance(mask, DocumentSpans)))
    if backend != "sdpa" and flash_ok:
        if mask is None:
            return flash_attn_func(q, k, v, causal=True)
        b, s = q.shape[:2]
        # max_seqlen only bounds the kernel's grid: S is always enough and keeps shapes static
        out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), mask.cu_seqlens,
                                     mask.cu_seqlens, s, s, causal=True)
        return out.unflatten(0, (b, s))
    if backend == "flash":
        raise BackendUnavailable(
            "model.attention_backend=flash needs the flash-attn package, CUDA half-precision tensors and no"
            " KV cache; use 'auto' or 'sdpa'"
        )
    if isinstance(mask, DocumentBlockMask) and flex_attention_usable(q):
        return flex_document_attention(q, k, v, mask)
    if backend == "auto" and (mask is None or isinstance(mask, torch.Tensor)) and cpu_attention_usable(q, k):
        return cpu_causal_attention(q, k, v, mask)
    return sdpa_causal_attention(q, k, v, mask)


def sdpa_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask = None
                          ) -> torch.Tensor:
    """:func:`causal_attention` through PyTorch's ``scaled_dot_product_attention`` (GQA natively from
    torch 2.5, by repeating k/v heads before); document spans and block masks become the equivalent
    dense mask."""
    if isinstance(mask, (DocumentSpans, DocumentBlockMask)):
        mask = document_mask(mask.doc_ids)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    causal = {"is_causal": True} if mask is None else {"attn_mask": mask}
    if q.shape[1] != k.shape[1]:
        if SDPA_HAS_GQA:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **causal)
            return out.transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, **causal).transpose(1, 2)
