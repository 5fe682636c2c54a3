"""The sequence layout of a mesh with a ring: every rank's tokens, and the exchanges that check them.

The sequence is cut into ``2R`` chunks; ring rank i holds chunks i and ``2R-1-i`` (one from the head, one from
the tail: causal load balance), split over its sp ranks (:func:`odysseus.layout.ring_shards`). ``shard_ring``
and ``gather_ring`` apply and undo the layout with one permutation of the tokens and the ``seq`` group's
(ring x sp) split and all-gather, so their autograd duals are those of :mod:`.autograd`.
"""

from __future__ import annotations

import torch

from ..layout import ring_chunks, ring_shards
from .autograd import all_gather_seq, split_seq
from .groups import group_size
from .lengths import gather_ints
from .mesh import Mesh


def _order(mesh: Mesh, n: int) -> tuple[torch.Tensor, list[int]]:
    """(global token index of every token in ``seq``-rank order, tokens of every ``seq`` rank)."""
    shards = ring_shards(n, mesh.ring_size, group_size(mesh.sp))
    S = group_size(mesh.sp)
    by_seq_rank: list = [None] * len(shards)
    for i, row in enumerate(mesh.seq_grid):
        for s, k in enumerate(row):
            by_seq_rank[k] = shards[i * S + s]
    index = [t for ranges in by_seq_rank for a, b in ranges for t in range(a, b)]
    return torch.tensor(index, dtype=torch.long), [sum(b - a for a, b in r) for r in by_seq_rank]


def shard_ring(x: torch.Tensor, mesh: Mesh, dim: int) -> torch.Tensor:
    """This rank's tokens of the whole ``x`` along ``dim`` under the ring layout; all-gather in backward."""
    n = x.shape[dim]
    index, sizes = _order(mesh, n)
    if min(sizes) == 0:
        raise ValueError(
            f"shard_sequence: a sequence of {n} tokens leaves a rank of the (ring {mesh.ring_size}, sp "
            f"{group_size(mesh.sp)}) mesh without tokens (shards {sizes})"
        )
    return split_seq(x.index_select(dim, index.to(x.device)), sizes, mesh.seq, dim, "shard_sequence")


def gather_ring(x_local: torch.Tensor, mesh: Mesh, dim: int) -> torch.Tensor:
    """The whole sequence from every rank's ring-layout tokens (inverse of :func:`shard_ring`)."""
    lengths = gather_lengths(x_local.shape[dim], mesh.seq, "gather_sequence")
    n = sum(lengths)
    index, sizes = _order(mesh, n)
    if lengths != sizes:
        raise ValueError(
            f"gather_sequence: the ranks hold {lengths} tokens, but shard_sequence splits {n} tokens over the "
            f"(ring {mesh.ring_size}, sp {group_size(mesh.sp)}) mesh as {sizes}"
        )
    whole = all_gather_seq(x_local, sizes, mesh.seq, dim, "gather_sequence")
    return whole.index_select(dim, torch.argsort(index).to(x_local.device))


@torch.compiler.disable  # host-side ints
def gather_lengths(local: int, pg, who: str, extra: list[int] | None = None) -> list[int] | list[list[int]]:
    """Every rank's ``local`` count over ``pg`` (its gloo twin), the same list on every rank; with ``extra``
    ints riding along, ``[local, *extra]`` of every rank."""
    every = gather_ints([local, *(extra or [])], pg, who)
    return every if extra else [e[0] for e in every]


def ring_lengths(local_total: int, mesh: Mesh, who: str, prints: list[int] | None = None) -> list[int]:
    """Every ring rank's token count (``local_total`` here, the sum over its sp ranks), checked against the ring
    layout of their sum: the same list, and the same error, on every ring rank. ``prints``: the
    :mod:`odysseus.comm.prints` fingerprint ``[valid, trivial, h0, h1]`` of this rank's input (checked by default);
    valid, non-trivial and identical on every ring rank means every ring rank was fed the same tokens (shards
    of the sp group alone, not of the mesh), which raises."""
    every = gather_lengths(local_total, mesh.ring, who, prints)
    lengths = [e[0] for e in every] if prints else every
    seen = [e[1:] for e in every] if prints else []
    if len(seen) > 1 and all(p[0] and not p[1] for p in seen) and len({tuple(p[2:]) for p in seen}) == 1:
        raise ValueError(
            f"{who}: every ring rank holds the same input ({lengths[0]} tokens each); a mesh with a ring takes each "
            "rank's odysseus.shard_sequence(x, mesh) tokens, not shards over sp alone (checked by default; "
            "check_inputs=False turns it off)"
        )
    n, R = sum(lengths), mesh.ring_size
    expected = [sum(e - s for s, e in chunks) for chunks in ring_chunks(n, R)]
    if lengths != expected or min(lengths) == 0:
        raise ValueError(
            f"{who}: the ring ranks hold {lengths} tokens, but shard_sequence(x, mesh) gives a sequence of {n} "
            f"tokens over a ring of {R} as {expected} (two chunks each, at least one token per rank); shard the "
            "inputs with odysseus.shard_sequence(x, mesh) and the same mesh"
        )
    return lengths
