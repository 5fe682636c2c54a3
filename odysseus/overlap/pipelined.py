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

import torch
import torch.distributed as dist

from ..comm.groups import group_rank, group_size
from ..comm.sizes import offsets


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


def matmul_rs(x: torch.Tensor, w: torch.Tensor, sizes: list[int], pg) -> torch.Tensor:
    """``reduce_scatter(x @ w)``; ``x: (B, L, K_r)``, ``w: (K_r, N)`` -> ``(B, L_r, N)``, a sequence-major view."""
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
