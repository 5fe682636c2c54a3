"""CUDA symmetric-memory backend: the odykernels consumers and producers fed through peer memory.

all-gather⊗GEMM: each rank copies its chunk into its own symmetric buffer; after a barrier, a side stream
pulls every peer's chunk (ring order from rank+1) with copy-engine copies straight from the peer's buffer,
and writes the call's epoch into a local per-chunk flag after each one. Meanwhile ``odykernels.ag_matmul``
multiplies the local chunk, then each chunk whose flag is set.

GEMM⊗reduce-scatter: ``odykernels.matmul_rs`` writes each destination's tiles into that peer's receive slot
for this rank and raises the peer's flag; ``odykernels.reduce_slots`` sums the local slots in source order.

Buffers are allocated once per (group, role, dtype, device), grown to the next power of two when a call
needs more (every rank sees the same sizes, so every rank grows together), and reused. Flags carry epochs
(a per-buffer call counter) so they are never reset. Barriers on the buffer's signal pads keep a call from
overwriting memory a peer still reads: one before a rank writes its own buffer, one before peers read it.

Rows travel sequence-major (token, then batch), so every rank's chunk is one contiguous block of rows.
"""

from __future__ import annotations

import os

import torch

from ..comm.groups import group_rank, group_size
from ..comm.ledger import record
from ..comm.sizes import offsets

MAX_POLLS = int(os.environ.get("ODYSSEUS_SYMM_MAX_POLLS", 1 << 22))
"""Flag reads before a kernel wait gives up and the launcher raises ``TimeoutError``."""
BARRIER_TIMEOUT_MS = int(os.environ.get("ODYSSEUS_SYMM_BARRIER_TIMEOUT_MS", 60_000))
"""Bound on every symmetric-memory barrier."""

_AVAILABLE: dict[str, bool] = {}
_WORKSPACES: dict[tuple, _Workspace] = {}


class _Workspace:
    """A symmetric data buffer and symmetric int32 flags for one (group, role, dtype, device)."""

    def __init__(self, pg, numel: int, dtype: torch.dtype, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        world = group_size(pg)
        self.numel = 1 << max(numel - 1, 1).bit_length()
        self.data = symm_mem.empty(self.numel, dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(self.data, pg.group_name)
        self.flags = symm_mem.empty(world, dtype=torch.int32, device=device).zero_()
        flag_handle = symm_mem.rendezvous(self.flags, pg.group_name)
        rank, es = group_rank(pg), self.data.element_size()
        ptrs, fptrs = self.handle.buffer_ptrs, flag_handle.buffer_ptrs
        # Peers are addressed as offsets from this rank's buffer (see odykernels.matmul_rs).
        self.peer_offsets = torch.tensor([(p - ptrs[rank]) // es for p in ptrs], dtype=torch.int64, device=device)
        self.flag_peer_offsets = torch.tensor([(p - fptrs[rank]) // 4 for p in fptrs], dtype=torch.int64, device=device)
        self.counters = torch.zeros(world, dtype=torch.int32, device=device)
        self.side = torch.cuda.Stream(device)
        self.epoch = 0
        torch.cuda.current_stream(device).synchronize()  # zeroed flags visible before any peer writes them

    def next_epoch(self) -> int:
        self.epoch += 1
        return self.epoch

    def barrier(self, channel: int) -> None:
        self.handle.barrier(channel=channel, timeout_ms=BARRIER_TIMEOUT_MS)


def _workspace(pg, role: str, numel: int, dtype: torch.dtype, device: torch.device) -> _Workspace:
    key = (pg.group_name, role, dtype, device)
    ws = _WORKSPACES.get(key)
    if ws is None or ws.numel < numel:
        if ws is not None:
            ws.barrier(0)  # peers are done with the old buffer before anyone drops it
        ws = _WORKSPACES[key] = _Workspace(pg, numel, dtype, device)
    return ws


def available(pg, device: torch.device) -> bool:
    """Whether this group can use symmetric memory on ``device`` (decided once per group, collectively)."""
    if device.type != "cuda" or pg is None or torch.compiler.is_compiling():
        return False
    name = pg.group_name
    if name not in _AVAILABLE:
        try:
            _workspace(pg, "probe", 1, torch.int32, device)
            _AVAILABLE[name] = True
        except (ImportError, RuntimeError):
            _AVAILABLE[name] = False
    return _AVAILABLE[name]


def _write_flag(flags: torch.Tensor, index: int, value: int) -> None:
    from torch.distributed._symmetric_memory import _SymmetricMemory

    if hasattr(_SymmetricMemory, "stream_write_value32"):
        _SymmetricMemory.stream_write_value32(flags, index, value)  # a copy-engine write: needs no SM
    else:
        flags[index].fill_(value)


def ag_matmul(x_local: torch.Tensor, w: torch.Tensor, sizes: list[int], pg, label: str):
    """``(all_gather(x_local) @ w, all_gather(x_local))``; ``x_local: (B, L_r, K)``, ``w: (K, N)``."""
    import odykernels

    world, rank = group_size(pg), group_rank(pg)
    o = offsets(sizes)
    B, _, K = x_local.shape
    L = o[-1]
    ws = _workspace(pg, "ag", L * B * K, x_local.dtype, x_local.device)
    buf = ws.data[: L * B * K].view(L * B, K)
    epoch = ws.next_epoch()
    main = torch.cuda.current_stream(x_local.device)

    ws.barrier(0)  # every peer has finished pulling from this buffer in the previous call
    buf[o[rank] * B : o[rank + 1] * B].view(sizes[rank], B, K).copy_(x_local.transpose(0, 1))
    ws.barrier(1)  # every rank's own chunk is in place
    ws.side.wait_stream(main)
    with torch.cuda.stream(ws.side):
        for step in range(1, world):
            j = (rank + step) % world
            rows = slice(o[j] * B, o[j + 1] * B)
            buf[rows].copy_(ws.handle.get_buffer(j, (L * B, K), x_local.dtype)[rows])
            _write_flag(ws.flags, j, epoch)
    out = odykernels.ag_matmul(buf, w, [s * B for s in sizes], rank, ws.flags, epoch, max_polls=MAX_POLLS)
    main.wait_stream(ws.side)
    # Kept for dW: a real copy (for B == 1 .contiguous() would return a view of the reused buffer).
    full = buf.view(L, B, K).transpose(0, 1).clone(memory_format=torch.contiguous_format)
    chunk_bytes = sizes[rank] * B * K * x_local.element_size()
    record(
        "all_gather", (world - 1) * chunk_bytes, (L - sizes[rank]) * B * K * x_local.element_size(), world, label=label
    )
    return out.view(L, B, -1).transpose(0, 1).contiguous(), full


def matmul_rs(x: torch.Tensor, w: torch.Tensor, sizes: list[int], pg, label: str) -> torch.Tensor:
    """``reduce_scatter(x @ w)``; ``x: (B, L, K_r)``, ``w: (K_r, N)`` -> ``(B, L_r, N)``."""
    import odykernels

    world, rank = group_size(pg), group_rank(pg)
    B, L, _ = x.shape
    N = w.shape[1]
    rows = [s * B for s in sizes]
    max_rows = max(rows)
    ws = _workspace(pg, "rs", world * max_rows * N, x.dtype, x.device)
    recv = ws.data[: world * max_rows * N].view(world, max_rows, N)
    epoch = ws.next_epoch()
    a = x.transpose(0, 1).reshape(L * B, x.shape[2])

    ws.barrier(0)  # every peer has reduced the previous call's slots: they may be overwritten
    odykernels.matmul_rs(
        a, w, rows, rank, recv, ws.peer_offsets, ws.flags, ws.flag_peer_offsets, epoch, counters=ws.counters
    )
    out = odykernels.reduce_slots(recv, ws.flags, rows, rank, epoch, max_polls=MAX_POLLS)
    es = x.element_size()
    record("reduce_scatter", (sum(rows) - rows[rank]) * N * es, (world - 1) * rows[rank] * N * es, world, label=label)
    return out.view(sizes[rank], B, N).transpose(0, 1).contiguous()
