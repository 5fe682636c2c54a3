"""Chunked backend for any process group (gloo included): the fused kernels' algorithm made of
asynchronous point-to-point transfers, one chunk per rank.

all-gather⊗GEMM: every rank posts its chunk to all peers, multiplies its own chunk first, then each
peer's chunk as it lands, in ring order from rank+1: while one chunk is multiplied the next is in flight.
GEMM⊗reduce-scatter: partial products are computed per destination chunk (rank+1 first, own last) and
sent as soon as each is ready; the received partials are summed in source order 0..N-1 in fp32, so the
result is deterministic.

Chunks travel sequence-major, ``(L_j, B, K)``, so that each rank's tokens are one contiguous block; the
results are ``(B, L, ·)`` views of that storage.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..comm.groups import group_rank, group_size
from ..layout import offsets
from .stream import Piece, Ring, peer_pieces

OVERLAPS_DGRAD = False
"""The re-gather of a streamed backward overlaps its weight-gradient GEMMs, not the input gradient's
GEMM⊗reduce-scatter: NCCL matches point-to-point operations between two ranks in the order they are posted,
whatever their tag, so two interleaved streams on one group could pair the wrong messages."""


def _peers(rank: int, world: int) -> list[int]:
    return [(rank + s) % world for s in range(1, world)]


def ag_matmul(x_local: torch.Tensor, w: torch.Tensor, sizes: list[int], pg) -> tuple[torch.Tensor, torch.Tensor]:
    """``(all_gather(x_local) @ w, all_gather(x_local))``; ``x_local: (B, L_r, K)``, ``w: (K, N)``."""
    world, rank = group_size(pg), group_rank(pg)
    o = offsets(sizes)
    B, _, K = x_local.shape
    full = x_local.new_empty(o[-1], B, K)
    mine = full[o[rank] : o[rank + 1]]
    mine.copy_(x_local.transpose(0, 1))
    recvs = {
        j: dist.irecv(full[o[j] : o[j + 1]], src=dist.get_global_rank(pg, j), group=pg) for j in _peers(rank, world)
    }
    sends = [dist.isend(mine, dst=dist.get_global_rank(pg, j), group=pg) for j in _peers(rank, world)]
    out = x_local.new_empty(o[-1], B, w.shape[1])
    torch.matmul(mine, w, out=out[o[rank] : o[rank + 1]])
    for j, work in recvs.items():
        work.wait()
        torch.matmul(full[o[j] : o[j + 1]], w, out=out[o[j] : o[j + 1]])
    for work in sends:
        work.wait()
    return out.transpose(0, 1), full.transpose(0, 1)


def matmul_rs(x: torch.Tensor, w: torch.Tensor, sizes: list[int], pg, ring: Ring | None = None) -> torch.Tensor:
    """``reduce_scatter(x @ w)``; ``x: (B, L, K_r)``, ``w: (K_r, N)`` -> ``(B, L_r, N)``, a sequence-major view.

    With a ``ring`` (``save_input="shard"``) the partial sums travel around the ring instead
    (:func:`_ring_matmul_rs`), so no rank holds more than three chunks of partials.
    """
    if ring is not None:
        return _ring_matmul_rs(x, w, sizes, pg)
    world, rank = group_size(pg), group_rank(pg)
    o = offsets(sizes)
    xs = x.transpose(0, 1)
    slots = x.new_empty(world, sizes[rank], x.shape[0], w.shape[1])
    recvs = [dist.irecv(slots[j], src=dist.get_global_rank(pg, j), group=pg) for j in _peers(rank, world)]
    sends = []
    for j in _peers(rank, world):
        partial = torch.matmul(xs[o[j] : o[j + 1]], w)
        sends.append((dist.isend(partial, dst=dist.get_global_rank(pg, j), group=pg), partial))
    torch.matmul(xs[o[rank] : o[rank + 1]], w, out=slots[rank])
    for work in recvs:
        work.wait()
    acc = slots[0].to(torch.promote_types(x.dtype, torch.float32), copy=True)
    for j in range(1, world):
        acc += slots[j]
    for work, _ in sends:  # the partials stay referenced until their sends complete
        work.wait()
    return acc.to(x.dtype).transpose(0, 1)


def _ring_matmul_rs(x: torch.Tensor, w: torch.Tensor, sizes: list[int], pg) -> torch.Tensor:
    """Ring reduce-scatter fused with the GEMM: at step k rank r sends the running sum of chunk ``r-k-1`` to
    rank r+1, receives that of chunk ``r-k-2`` from rank r-1 and adds its own partial of it, computed while
    the message travels; after ``world-1`` steps it holds the sum of chunk r. Sums are rounded to the input
    dtype on the wire (as a collective's ring does) after an fp32 add; the order is fixed: deterministic."""
    world, rank = group_size(pg), group_rank(pg)
    o = offsets(sizes)
    xs = x.transpose(0, 1)
    right, left = dist.get_global_rank(pg, (rank + 1) % world), dist.get_global_rank(pg, (rank - 1) % world)
    acc = torch.promote_types(x.dtype, torch.float32)

    def partial(c: int) -> torch.Tensor:
        return torch.matmul(xs[o[c] : o[c + 1]], w)

    running = partial((rank - 1) % world)
    for k in range(world - 1):
        c = (rank - k - 2) % world
        incoming = x.new_empty(sizes[c], x.shape[0], w.shape[1])
        recv = dist.irecv(incoming, src=left, group=pg)
        send = dist.isend(running, dst=right, group=pg)
        mine = partial(c)
        recv.wait()
        send.wait()
        running = (incoming.to(acc) + mine.to(acc)).to(x.dtype)
    return running.transpose(0, 1)


def gather_stream(x_local: torch.Tensor, sizes: list[int], pg, ring: Ring) -> Iterator[Piece]:
    """The gathered sequence piece by piece: own chunk first, then the peers' pieces through ``ring.slots``
    receive buffers, each reposted once its piece has been consumed. This rank's pieces go to every peer
    up front (they are views of its own chunk: no extra memory)."""
    world, rank = group_size(pg), group_rank(pg)
    o = offsets(sizes)
    B, _, K = x_local.shape
    tokens = ring.piece_tokens(sizes)
    mine = x_local.transpose(0, 1).contiguous()  # (L_r, B, K): the send buffer and the first piece
    sends = [
        dist.isend(mine[t : t + tokens], dst=dist.get_global_rank(pg, j), group=pg)
        for j in _peers(rank, world)
        for t in range(0, sizes[rank], tokens)
    ]
    wanted = peer_pieces(sizes, rank, tokens)
    slots = x_local.new_empty(max(1, min(ring.slots, len(wanted))), tokens, B, K)

    def post(i: int):
        owner, t0, t1 = wanted[i]
        buf = slots[i % len(slots)][: t1 - t0]
        return dist.irecv(buf, src=dist.get_global_rank(pg, owner), group=pg), buf

    pending = deque(post(i) for i in range(min(len(slots), len(wanted))))
    yield o[rank], o[rank + 1], mine
    for i, (_, t0, t1) in enumerate(wanted):
        work, buf = pending.popleft()
        work.wait()
        yield t0, t1, buf
        if i + len(slots) < len(wanted):  # the consumer is done with this slot: refill it
            pending.append(post(i + len(slots)))
    for work in sends:
        work.wait()
