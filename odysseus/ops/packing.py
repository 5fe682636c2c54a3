"""Packed sequences: several documents in one row, told apart by ``position_ids`` that restart at 0.

A token at position 0 starts a document (the first token of a row always does): the convention of
transformers' ``DataCollatorWithFlattening`` and of its flash-attention varlen path. Attention never crosses
a document boundary. The document structure is computed from the *global* positions (the whole sequence),
which every strategy has where its attention runs.

Kernels: flash-attn's varlen function on CUDA in fp16/bf16 when flash-attn is installed, else FlexAttention
(compiled) on CUDA, else PyTorch SDPA with a dense ``(L, L)`` document mask (CPU; memory grows as L^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional extra: pip install odysseus[flash]
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch version
    create_block_mask = flex_attention = None

_compiled_flex = None


def document_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """``position_ids: (batch or 1, L)`` of the whole sequence -> ``(batch or 1, L)`` int64 document index of
    every token (equal within a document, per row), or None when no row holds more than one document.

    Reads one bool back to the host (whether a row restarts), so the plain causal kernel runs when nothing
    is packed.
    """
    starts = position_ids == 0
    if not bool(starts[:, 1:].any()):
        return None
    return starts.long().cumsum(-1)


def check_window(window: int | None, length: int, who: str) -> None:
    """Raise unless a sliding window of ``window`` tokens covers a sequence of ``length`` tokens.

    Every rank calls it with the global length, so every rank raises alike.
    """
    if window is not None and length > window:
        raise ValueError(
            f"{who}: the sequence holds {length} tokens but sliding_window={window}; odysseus does not implement "
            f"windowed attention, so the window must cover the whole sequence (length <= {window})"
        )


def document_mask(documents: torch.Tensor, causal: bool) -> torch.Tensor:
    """``(batch or 1, L)`` document ids -> ``(batch or 1, 1, L, L)`` bool, True where a query may attend a key."""
    L = documents.shape[-1]
    mask = documents[:, :, None] == documents[:, None, :]
    if causal:
        mask = mask & torch.ones(L, L, dtype=torch.bool, device=documents.device).tril()
    return mask[:, None]


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: torch.Tensor, causal: bool
) -> torch.Tensor:
    """Attention of ``q: (B, L, Hq, D)`` over ``k, v: (B, L, Hkv, D)`` within documents -> ``(B, L, Hq, D)``.

    ``Hq`` must be a multiple of ``Hkv`` (query head i reads kv head ``i // (Hq // Hkv)``); scale ``D**-0.5``.
    """
    if q.is_cuda and flash_attn_varlen_func is not None and q.dtype in (torch.float16, torch.bfloat16):
        return _varlen(q, k, v, documents, causal)
    if q.is_cuda and flex_attention is not None:
        return flex_documents(q, k, v, documents, causal, compiled=True)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=document_mask(documents, causal),
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)


def _varlen(q, k, v, documents, causal):
    B, L = q.shape[:2]
    # Documents never span rows: number them across rows, then cut the flattened tokens where the id changes.
    ids = documents.expand(B, L) + torch.arange(B, device=q.device)[:, None] * (L + 1)
    ids = ids.reshape(-1)
    cuts = torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1
    edges = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), B * L)]).to(torch.int32)
    longest = int((edges[1:] - edges[:-1]).max())
    out = flash_attn_varlen_func(
        q.reshape(B * L, *q.shape[2:]),
        k.reshape(B * L, *k.shape[2:]),
        v.reshape(B * L, *v.shape[2:]),
        edges,
        edges,
        longest,
        longest,
        causal=causal,
    )
    return out.view(B, L, *q.shape[2:])


def flex_documents(q, k, v, documents, causal: bool, compiled: bool = True) -> torch.Tensor:
    """:func:`packed_attention` through FlexAttention with a block-sparse document mask; ``compiled=False``
    runs it eagerly (unfused, for checking the mask on CPU)."""
    global _compiled_flex
    B, L = q.shape[:2]
    docs = documents.expand(B, L)

    def mask_mod(b, h, q_idx, kv_idx):
        same = docs[b, q_idx] == docs[b, kv_idx]
        return same & (q_idx >= kv_idx) if causal else same

    block_mask = create_block_mask(mask_mod, B, None, L, L, device=q.device)
    if compiled and _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    attend = _compiled_flex if compiled else flex_attention
    out = attend(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        block_mask=block_mask,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)
