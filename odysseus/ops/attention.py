"""Attention on the heads a rank holds: flash-attn where it can run, else PyTorch SDPA.

Both take GQA natively when every local kv head serves the same number of consecutive query heads.
An uneven head split can break that (e.g. query heads 1..3 reading kv heads 0, 0, 1); then the kv
heads are expanded to one per query head, which costs memory but not correctness. Packed sequences
(``documents``) go to :func:`odysseus.ops.packing.packed_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import uniform_gqa
from ..profiling import ody_range
from .packing import packed_attention

try:  # optional extra: pip install odysseus[flash]
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_of_q: list[int],
    causal: bool = True,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of ``q: (B, L, Hq, D)`` over ``k, v: (B, L, Hkv, D)`` -> ``(B, L, Hq, D)``.

    ``kv_of_q[i]`` is the local kv head that local query head i reads; the scale is ``D**-0.5``.
    ``documents``: ``(B or 1, L)`` document ids of packed sequences (:func:`odysseus.ops.packing.document_ids`);
    no token attends across documents.
    """
    with ody_range("ody/attn"):
        return _attention(q, k, v, kv_of_q, causal, documents)


def _attention(q, k, v, kv_of_q, causal, documents):
    if len(kv_of_q) != q.shape[2] or max(kv_of_q) >= k.shape[2]:
        raise ValueError(f"kv_of_q={kv_of_q} does not fit {q.shape[2]} query heads and {k.shape[2]} kv heads")
    if not uniform_gqa(kv_of_q, k.shape[2]):
        index = torch.tensor(kv_of_q, device=k.device)
        k, v = k.index_select(2, index), v.index_select(2, index)
    if documents is not None:
        return packed_attention(q, k, v, documents, causal)
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q, k, v, causal=causal)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=k.shape[2] != q.shape[2]
    )
    return out.transpose(1, 2)
