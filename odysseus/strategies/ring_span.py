"""Attention over the sequence where the mesh has a ring: the ring rank's positions and its ring attention.

The head-parallel part of a strategy runs over ``sp`` on the tokens of its ring rank (two chunks of the
sequence, :func:`odysseus.layout.ring_chunks`); this module gives those tokens their true global positions
(RoPE, the causal mask) and runs attention as a ring over ``ring`` (:mod:`odysseus.comm.ring`). Without a
ring both fall back to the sp-only path, so the attention modules call the same two functions either way.
"""

from __future__ import annotations

import torch

from ..comm import primitives
from ..comm.groups import group_rank
from ..comm.mesh import Mesh
from ..comm.ring import RingPlan, ring_attention
from ..comm.ring_layout import ring_lengths
from ..layout import ring_chunks
from ..ops.attention import local_attention
from ..ops.packing import document_ids


class RingSpan:
    """One forward call over the ring: every ring rank's token indices (``tokens[j]``, CPU, ascending)."""

    def __init__(self, mesh: Mesh, lengths: list[int]):
        self.pg, self.rank, self.lengths = mesh.ring, group_rank(mesh.ring), lengths
        self.total = sum(lengths)
        self.tokens = [torch.cat([torch.arange(s, e) for s, e in c]) for c in ring_chunks(self.total, len(lengths))]
        self._whole: torch.Tensor | None = None

    def whole_positions(self, every: torch.Tensor) -> torch.Tensor:
        """The positions ``(B or 1, L)`` of the whole sequence from this ring rank's ``every: (B or 1, T)``
        (an all-gather of ints over the ring, once per call)."""
        if self._whole is None:
            got = primitives.all_gather(
                every.contiguous(), self.lengths, self.pg, 1, category="metadata", label="ring positions"
            )
            whole = torch.empty_like(got)
            whole[:, torch.cat(self.tokens).to(got.device)] = got
            self._whole = whole
        return self._whole

    def attend(self, q, k, v, kv_of_q: list[int], causal: bool, given: torch.Tensor | None) -> torch.Tensor:
        """Ring attention of ``q: (B, T, Hq, D)`` over every ring rank's ``k, v: (B, T_j, Hkv, D)``; ``given``:
        this ring rank's given positions (packed documents), None for the default ones."""
        documents = None
        if given is not None:
            docs = document_ids(self.whole_positions(given))
            if docs is not None:
                documents = [docs[:, t.to(docs.device)] for t in self.tokens]
        gqa = None if list(kv_of_q) == list(range(k.shape[2])) else torch.tensor(kv_of_q, device=q.device)
        plan = RingPlan(self.pg, self.tokens, documents, causal, q.shape[-1] ** -0.5, gqa)
        return ring_attention(q, k, v, plan)


def open_ring(mesh: Mesh, local_total: int, who: str, prints: list[int] | None = None) -> RingSpan | None:
    """The :class:`RingSpan` of a call whose ring rank holds ``local_total`` tokens (its sp ranks' together),
    checked on every ring rank; None without a ring. ``prints``: the fingerprint of this rank's input the region
    took for its own exchange (:mod:`odysseus.comm.prints`; None where inputs are not checked), compared across
    the ring too."""
    if mesh.ring is None:
        return None
    return RingSpan(mesh, ring_lengths(local_total, mesh, who, prints))


def sequence_positions(span, ring: RingSpan | None, position_ids, batch: int, device) -> torch.Tensor:
    """Positions ``(B or 1, T)`` of the tokens attention sees here: the region's (given ones, gathered over sp),
    or, on a ring with none given, the true global positions of this ring rank's two chunks."""
    if ring is None or position_ids is not None:
        return span.positions(position_ids, batch, device)
    return ring.tokens[ring.rank][None].to(device)


def attend(ring: RingSpan | None, q, k, v, kv_of_q, causal: bool, given: torch.Tensor | None) -> torch.Tensor:
    """Attention of ``q: (B, T, Hq, D)``: local (no ring) or as a ring; ``given``: the positions of ``q``'s tokens
    where position ids were given (packed documents), else None."""
    if ring is not None:
        return ring.attend(q, k, v, kv_of_q, causal, given)
    documents = None if given is None else document_ids(given)
    return local_attention(q, k, v, list(kv_of_q), causal, documents)


def longest_position(ring: RingSpan | None, every: torch.Tensor, given: bool) -> torch.Tensor:
    """The largest position of the whole sequence (longrope picks its factors by it)."""
    if ring is None:
        return every.max()
    return ring.whole_positions(every).max() if given else torch.tensor(ring.total - 1, device=every.device)
