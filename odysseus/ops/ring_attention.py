"""One block of ring attention and the merge of blocks by their log-sum-exp; free of process groups.

In ring attention a rank's queries meet the keys of every ring rank one block at a time. Each block gives a
partial output and, per query and head, the log-sum-exp (lse) of its scores; blocks merge as an online
softmax (:func:`merge`). Backward of a block takes the *merged* output and lse, so each block's share of
``dq, dk, dv`` is exact (``P = exp(S - lse)`` is the block's slice of the full softmax).

Tokens are named by their index in the whole sequence (``q_index``, ``k_index``: ascending); the causal mask
compares them, and ``documents`` (packed sequences) keep attention inside a document. A block only computes
the query rows that see some key and the keys that some query sees: with the load-balanced layout half of
every off-diagonal block. Scores are kept in fp32 (fp64 for fp64 inputs), a ``TILE x TILE`` tile of queries by
keys at a time (the key tiles merged by lse too), so a block's transients do not grow with the sequence. kv heads arrive
unexpanded and are expanded here, per block, to the query heads that read them (``kv_of_q``).

The math is plain torch (any device, any dtype, any mask); a fused kernel returning the lse (flash-attn, or
torch's flash/efficient SDPA ops on CUDA) can replace :func:`block_forward`/:func:`block_backward` without
touching the ring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TILE = 512
"""Query rows and key columns whose scores a block computes at once (a ``TILE x TILE`` tile per head)."""


@dataclass(frozen=True)
class TileMask:
    """Which query-key pairs of a block are hidden, made one score tile at a time: a whole block's mask would be
    one byte per pair, ``(L/R)^2`` at ring step 0, the one term of a ring rank's memory that grows faster than
    its tokens. ``q_index: (rows,)``, ``k_index: (cols,)`` global token indices (compared where ``causal``);
    ``q_docs: (B or 1, rows)``, ``k_docs: (B or 1, cols)`` document ids (None: one document)."""

    q_index: torch.Tensor
    k_index: torch.Tensor
    causal: bool
    q_docs: torch.Tensor | None = None
    k_docs: torch.Tensor | None = None

    def hidden(self, rows: slice, cols: slice) -> torch.Tensor:
        """``(B or 1, len(rows), len(cols))`` bool: True where the query does not see the key."""
        out = None
        if self.causal:
            out = (self.q_index[rows, None] < self.k_index[None, cols])[None]
        if self.q_docs is not None:
            other = self.q_docs[:, rows, None] != self.k_docs[:, None, cols]
            out = other if out is None else out | other
        return out


@dataclass(frozen=True)
class Block:
    """The part of a (queries, keys) pair that attention must compute: query rows ``[q_lo:]``, key columns
    ``[:k_hi]``, and the :class:`TileMask` of those rows and columns (None: every query sees every key)."""

    q_lo: int
    k_hi: int
    mask: TileMask | None

    @property
    def empty(self) -> bool:
        return self.k_hi == 0 or self.q_lo < 0


def plan_block(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    causal: bool,
    q_docs: torch.Tensor | None = None,
    k_docs: torch.Tensor | None = None,
    device=None,
) -> Block:
    """The :class:`Block` of queries at global indices ``q_index: (Tq,)`` (CPU, ascending) and keys at
    ``k_index: (Tk,)``; ``q_docs: (B or 1, Tq)``, ``k_docs: (B or 1, Tk)`` document ids of packed sequences.
    The mask's indices lie on ``device`` (the documents' device where given)."""
    Tq, Tk = len(q_index), len(k_index)
    if Tq == 0 or Tk == 0:
        return Block(-1, 0, None)
    if causal:
        q_lo = int(torch.searchsorted(q_index, k_index[0]))  # queries before the first key see nothing
        k_hi = int(torch.searchsorted(k_index, q_index[-1], right=True))  # keys after the last query: unseen
        if q_lo == Tq or k_hi == 0:
            return Block(-1, 0, None)
    else:
        q_lo, k_hi = 0, Tk
    qi, ki = q_index[q_lo:], k_index[:k_hi]
    hides = causal and int(ki[-1]) > int(qi[0])  # some key lies after some query
    if not hides and q_docs is None:
        return Block(q_lo, k_hi, None)
    where = device if q_docs is None else q_docs.device
    docs = (None, None) if q_docs is None else (q_docs[:, q_lo:], k_docs[:, :k_hi])
    return Block(q_lo, k_hi, TileMask(qi.to(where), ki.to(where), hides, *docs))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand(t: torch.Tensor, kv_of_q: torch.Tensor | None) -> torch.Tensor:
    return t if kv_of_q is None else t.index_select(2, kv_of_q)


def _scores(q, k, hidden, scale):
    """``(B, H, Tq, Tk)`` scaled scores, ``-inf`` where ``hidden: (B or 1, Tq, Tk)``."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    return s if hidden is None else s.masked_fill(hidden[:, None].to(s.device), float("-inf"))


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with the ``-inf`` of rows that see no key replaced by 0, so ``exp(s - lse)`` is 0 there, not NaN."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _tiles(n: int, size: int) -> list[slice]:
    return [slice(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _sub(mask: TileMask | None, rows: slice, cols: slice) -> torch.Tensor | None:
    return None if mask is None else mask.hidden(rows, cols)


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: TileMask | None, scale: float, kv_of_q=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q: (B, Tq, Hq, D)`` over ``k, v: (B, Tk, Hkv, D)`` -> ``(out (B, Tq, Hq, D), lse (B, Hq, Tq))``
    in the accumulation dtype; ``kv_of_q``: (Hq,) long index of the kv head each query head reads (None when
    ``Hkv == Hq``). Rows that see no key get ``out = 0`` and ``lse = -inf``. Computed a tile of queries by a tile
    of keys at a time, the key tiles merged by :func:`merge`."""
    acc = _acc(q.dtype)
    k, v = _expand(k, kv_of_q).to(acc), _expand(v, kv_of_q).to(acc)
    outs, lses = [], []
    for rows in _tiles(q.shape[1], TILE):
        qt, out, lse = q[:, rows].to(acc), None, None
        for cols in _tiles(k.shape[1], TILE):
            s = _scores(qt, k[:, cols], _sub(mask, rows, cols), scale)
            part = torch.logsumexp(s, -1)
            o = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - _finite(part)[..., None]), v[:, cols])
            out, lse = merge(out, lse, o, part)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, -1)


def merge(
    out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online softmax: the attention over the keys of both ``(out, lse)`` and ``(block_out, block_lse)``
    (``out: (B, T, H, D)``, ``lse: (B, H, T)``; ``out=None`` starts the merge)."""
    if out is None:
        return block_out, block_lse
    new = torch.logaddexp(lse, block_lse)
    safe = _finite(new)
    w_old = torch.exp(lse - safe).transpose(1, 2)[..., None]
    w_new = torch.exp(block_lse - safe).transpose(1, 2)[..., None]
    return out * w_old + block_out * w_new, new


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: TileMask | None,
    scale: float,
    kv_of_q=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's ``(dq (B, Tq, Hq, D), dk, dv (B, Tk, Hkv, D))`` in the accumulation dtype, given the merged
    ``out: (B, Tq, Hq, D)`` and ``lse: (B, Hq, Tq)`` over all blocks and ``dout`` of the merged output."""
    acc = _acc(q.dtype)
    Hkv = k.shape[2]
    ke, ve = _expand(k, kv_of_q).to(acc), _expand(v, kv_of_q).to(acc)
    dk, dv, dqs = torch.zeros_like(ke), torch.zeros_like(ve), []
    for rows in _tiles(q.shape[1], TILE):
        qt, dot = q[:, rows].to(acc), dout[:, rows].to(acc)
        rowdot = (dot * out[:, rows].to(acc)).sum(-1).transpose(1, 2)[..., None]  # (B, H, tile, 1)
        lse_t = _finite(lse[..., rows])[..., None]
        dq = torch.zeros_like(qt)
        for cols in _tiles(k.shape[1], TILE):
            p = torch.exp(_scores(qt, ke[:, cols], _sub(mask, rows, cols), scale) - lse_t)
            dv[:, cols] += torch.einsum("bhqk,bqhd->bkhd", p, dot)
            ds = p * (torch.einsum("bqhd,bkhd->bhqk", dot, ve[:, cols]) - rowdot)
            dq += torch.einsum("bhqk,bkhd->bqhd", ds, ke[:, cols]) * scale
            dk[:, cols] += torch.einsum("bhqk,bqhd->bkhd", ds, qt) * scale
        dqs.append(dq)
    dq = torch.cat(dqs, 1)
    if kv_of_q is not None:  # sum the expanded heads back onto the kv heads they came from
        dk = dk.new_zeros(*dk.shape[:2], Hkv, dk.shape[3]).index_add_(2, kv_of_q, dk)
        dv = dv.new_zeros(*dv.shape[:2], Hkv, dv.shape[3]).index_add_(2, kv_of_q, dv)
    return dq, dk, dv
