"""Gathering a sequence piece by piece through a bounded ring of slots (``save_input="shard"``).

With ``save_input="gathered"`` an all-gather⊗GEMM materialises the whole gathered input ``(B, L, K)`` and
keeps it for the weight gradient. With ``"shard"`` nothing of that size exists at any time: the op keeps
only this rank's shard, and every gather (forward, the backward re-gather for the weight gradient, the
gradient gather of GEMM⊗reduce-scatter) delivers the sequence in *pieces* of at most ``ring.tokens``
tokens through ``ring.slots`` receive slots. A slot is refilled once its piece has been consumed, so the
transient of one op is ``slots x tokens x B x K`` elements, whatever L is.

Each backend yields the pieces (``gather_stream``): this rank's own chunk first (no transfer), then the
peers' pieces in ring order from rank+1. The consumers here turn them into the ops' results.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..layout import offsets

Piece = tuple[int, int, torch.Tensor]
"""(first token, end token, rows ``(end - first, B, K)``, sequence-major and contiguous)."""


@dataclass(frozen=True)
class Ring:
    """The receive slots of a streamed gather."""

    tokens: int | None = None
    """Tokens per piece; None: a quarter of the largest shard (so 2 slots hold half a shard)."""
    slots: int = 2
    """Pieces in flight at once (>= 1; 2 lets one piece land while the previous is consumed)."""

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"Ring.slots={self.slots} must be >= 1")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError(f"Ring.tokens={self.tokens} must be >= 1 (or None)")

    def piece_tokens(self, sizes: list[int]) -> int:
        """Tokens per piece for shards of ``sizes``."""
        return self.tokens if self.tokens is not None else max(1, -(-max(sizes) // 4))


def peer_pieces(sizes: list[int], rank: int, tokens: int) -> list[tuple[int, int, int]]:
    """``(owner, first, end)`` global token ranges of every peer's chunk, in ring order from ``rank + 1``,
    each chunk cut into pieces of at most ``tokens`` tokens."""
    o = offsets(sizes)
    out = []
    for step in range(1, len(sizes)):
        j = (rank + step) % len(sizes)
        out += [(j, t, min(t + tokens, o[j + 1])) for t in range(o[j], o[j + 1], tokens)]
    return out


def ag_matmul(stream: Iterator[Piece], w: torch.Tensor, L: int, B: int) -> torch.Tensor:
    """``gather(x) @ w`` from a stream of pieces: ``(B, L, N)``, a view of sequence-major storage."""
    out = w.new_empty(L, B, w.shape[1])
    for t0, t1, piece in stream:
        torch.matmul(piece, w, out=out[t0:t1])
    return out.transpose(0, 1)


def _accumulate(dw: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``dw + a^T b`` over the (tokens, batch) rows of ``a: (t, B, K)`` and ``b: (t, B, N)``, summed in fp32."""
    part = (a.reshape(-1, a.shape[-1]).t() @ b.reshape(-1, b.shape[-1])).to(torch.promote_types(a.dtype, torch.float32))
    return part if dw is None else dw.add_(part)


def ag_backward(stream: Iterator[Piece], d_out: torch.Tensor, dgrad, dtype: torch.dtype, overlap: bool):
    """Backward of a streamed all-gather⊗GEMM: ``(dgrad(), dw)`` with ``dw`` accumulated piece by piece.

    ``stream`` re-gathers the input. With ``overlap``, its first piece (this rank's own) is taken before
    ``dgrad()`` (the GEMM⊗reduce-scatter of the input gradient) runs, which starts the peers' transfers so
    that they overlap it; otherwise the re-gather starts after it.
    """
    if overlap:
        first = next(stream)
        dx = dgrad()
        stream = itertools.chain([first], stream)
    else:
        dx = dgrad()
    d_sm = d_out.transpose(0, 1)
    dw = None
    for t0, t1, piece in stream:
        dw = _accumulate(dw, piece, d_sm[t0:t1])
    return dx, dw.to(dtype)


def rs_backward(stream: Iterator[Piece], x: torch.Tensor, w: torch.Tensor):
    """Backward of GEMM⊗reduce-scatter with the output gradient re-gathered piece by piece: ``(dx, dw)``.

    ``x: (B, L, K_r)`` the saved input, ``w: (K_r, N)``; each piece ``(t, B, N)`` of the gathered gradient
    gives its rows of ``dx = d_full @ w^T`` and its share of ``dw = x^T d_full``.
    """
    B, L, K = x.shape
    x_sm = x.transpose(0, 1)
    dx = x.new_empty(L, B, K)
    dw = None
    for t0, t1, piece in stream:
        torch.matmul(piece, w.t(), out=dx[t0:t1])
        dw = _accumulate(dw, x_sm[t0:t1], piece)
    return dx.transpose(0, 1), dw.to(w.dtype)
