"""The symm backend: odykernels' fused GEMMs fed through symmetric memory (CUDA, or its emulation on CPU).

all-gather⊗GEMM: each rank stages only its own chunk in its symmetric buffer. After a barrier, the copy
engine pulls every peer's chunk (ring order from rank+1) straight into the ordinary tensor autograd keeps,
and writes the call's epoch into a local per-chunk flag after each pull. Meanwhile
``odykernels.ag_matmul`` multiplies the local chunk, then each chunk whose flag is set.

GEMM⊗reduce-scatter: ``odykernels.matmul_rs`` writes each destination's tiles into that peer's receive
slot for this rank and raises the peer's flag; ``odykernels.reduce_slots`` sums the local slots in source
order.

Rows travel sequence-major (token, then batch): every rank's chunk is one contiguous block, so a pull is a
plain memcpy on the copy engine. Outputs are ``(B, L, N)`` views of sequence-major storage; an input
that is such a view costs no transposing copy.

Workspaces are kept per (group, role, dtype, device), grown to the next power of two when a call needs
more (every rank computes the same size from the global lengths, so every rank grows together), and
reused. Flags carry epochs (a per-workspace call counter), so they are never reset. A barrier before a
rank overwrites its buffer keeps a call from clobbering what a peer still reads.

Stream order: staging copies, barriers, kernel launches and pulls are queued on the runtime's streams
(:mod:`.transport`), never run by the host, and a call's outputs go to the host's next torch ops through
``hand_off`` (a no-op on CUDA, where those ops queue behind them; a wait on the emulated runtime's stream).
Kernel launches carry their guards (which flag makes which region readable) and the peer memory they
push into, for the emulated runtime's race detector.

No host synchronisation per op: every wait (kernels' and barriers') records a timeout in the workspace's
status record, which :func:`check` reads once (``odysseus.check_overlap()``, called by ``finalize_grads``).
Every kernel a call needs is compiled before the call's first barrier, so one rank's first-call compile
never eats a peer's wait budget.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterator

import torch

import odykernels
from odykernels import signal
from odykernels.barrier import timeout_message
from odykernels.signal import check_status, new_status

from ..comm.groups import group_rank, group_size
from ..layout import offsets
from .stream import Piece, Ring, peer_pieces
from .transport import FLAG_DTYPE, transport_for
from .transport.device import DeviceBuffer

OVERLAPS_DGRAD = True
"""A streamed backward starts the re-gather's pulls (copy engine) before the input gradient's kernels."""

TIMEOUT_S = float(os.environ.get("ODYSSEUS_SYMM_TIMEOUT_S", 60.0))
"""Bound on every wait of the backend: kernel flag waits and barriers (and, emulated, a stream's wait for an event)."""
EPOCH_START = 0
"""A workspace's epoch before its first call (tests start near the wrap at 2**31 - 1)."""
ALIGN_BYTES = 16
"""Receive slots and rows start 16-byte aligned, so the producer's peer stores can be 128 bits wide."""


def _host_wait_s() -> float:
    """Bound on a host wait for a stream: its work holds a few bounded waits, each at most TIMEOUT_S."""
    return 4 * TIMEOUT_S + 30


def _grown(numel: int) -> int:
    return 1 << max(numel - 1, 1).bit_length()


class _Workspace:
    """Symmetric buffers, flags, a status record and an epoch for one (group, role, dtype, device)."""

    def __init__(self, pg, role: str, dtype: torch.dtype, device: torch.device, symmetric_flags: bool):
        self.pg, self.role, self.dtype, self.device = pg, role, dtype, device
        self.rank, self.world = group_rank(pg), group_size(pg)
        self.transport = transport_for(device)
        self.status = new_status(device)
        self.data: DeviceBuffer | None = None
        if symmetric_flags:  # peers write them: they live in symmetric memory too
            self.flag_buffer = self.transport.allocate(pg, self.world, FLAG_DTYPE, TIMEOUT_S, self.status)
            self.flags = self.flag_buffer.local
        else:  # only this rank's copy engine writes them
            self.flag_buffer = None
            self.flags = torch.zeros(self.world, dtype=FLAG_DTYPE, device=device)
        self.counters = torch.zeros(self.world, dtype=torch.int32, device=device)
        self.epoch = EPOCH_START

    def reserve(self, numel: int) -> DeviceBuffer:
        """The data buffer, at least ``numel`` elements (collective when it grows: same ``numel`` on all ranks)."""
        if self.data is None or self.data.numel < numel:
            if self.data is not None:
                self.data.barrier(0, TIMEOUT_S)  # peers are done with the old buffer before anyone drops it
            self.data = self.transport.allocate(self.pg, _grown(numel), self.dtype, TIMEOUT_S, self.status)
        return self.data

    def next_epoch(self) -> int:
        self.epoch = self.epoch % (2**31 - 1) + 1  # flags hold [1, 2**31); 0 means never written
        return self.epoch

    def check(self) -> None:
        """Raise ``TimeoutError`` if a barrier or kernel wait gave up (one host read of the record when none did)."""
        what, index = ("ag_matmul", "chunk") if self.role == "ag" else ("reduce_slots", "source")
        where = f"(symm, group {self.pg.group_name})"
        words = signal.read_status(self.status)
        if words[0] == 0:
            return
        message = timeout_message(words, self.rank, f"symmetric-memory barrier {where}")
        if message is not None:
            raise TimeoutError(message)
        check_status(self.status, self.rank, f"{what} {where}", index)


_WORKSPACES: dict[tuple, _Workspace] = {}
os.register_at_fork(after_in_child=_WORKSPACES.clear)


def _workspace(pg, role: str, dtype: torch.dtype, device: torch.device) -> _Workspace:
    key = (pg.group_name, role, dtype, device)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = _Workspace(pg, role, dtype, device, symmetric_flags=role == "rs")
    return ws


def _rs_layout(max_rows: int, N: int, dtype: torch.dtype) -> tuple[int, int]:
    """(rows per slot, row stride) of the receive buffer: both padded to 16-byte multiples."""
    return _aligned(max_rows, dtype), _aligned(N, dtype)


def reserve(pg, dtype: torch.dtype, device: torch.device, ag_numel: int, rs_rows: int, rs_cols: int) -> None:
    """Allocate (collectively) both workspaces of a group for calls up to these sizes, without running one.

    ``ag_numel``: elements of one rank's largest chunk ``(L_r, B, K)``; ``rs_rows``/``rs_cols``: rows of the
    largest output chunk (``L_r * B``) and its width N.
    """
    _workspace(pg, "ag", dtype, device).reserve(ag_numel)
    max_rows, row_stride = _rs_layout(rs_rows, rs_cols, dtype)
    _workspace(pg, "rs", dtype, device).reserve(group_size(pg) * max_rows * row_stride)


def check() -> None:
    """Raise ``TimeoutError`` if a wait of any symm call so far gave up (reads each status record once)."""
    for ws in list(_WORKSPACES.values()):
        ws.check()


def ag_matmul(x_local: torch.Tensor, w: torch.Tensor, sizes: list[int], pg) -> tuple[torch.Tensor, torch.Tensor]:
    """``(all_gather(x_local) @ w, all_gather(x_local))``; ``x_local: (B, L_r, K)``, ``w: (K, N)``.

    Both results are ``(B, L, ·)`` views of sequence-major tensors.
    """
    world, rank = group_size(pg), group_rank(pg)
    o = offsets(sizes)
    B, L_r, K = x_local.shape
    L = o[-1]
    ws = _workspace(pg, "ag", x_local.dtype, x_local.device)
    stage = ws.reserve(max(sizes) * B * K)
    full = x_local.new_empty(L, B, K)
    launch = odykernels.prepare_ag_matmul(
        full.view(L * B, K), w, [s * B for s in sizes], rank, ws.flags, ws.next_epoch(),
        timeout_s=TIMEOUT_S, status=ws.status,
    ).compile()  # fmt: skip

    engine = ws.transport
    stage.barrier(0, TIMEOUT_S)  # every peer has finished pulling this buffer's previous contents
    mine = stage.local[: L_r * B * K].view(L_r, B, K)
    engine.copy(mine, x_local.transpose(0, 1))
    engine.copy(full[o[rank] : o[rank + 1]], mine)
    stage.barrier(1, TIMEOUT_S)  # every rank's own chunk is in place
    peers = [(rank + step) % world for step in range(1, world)]
    for j in peers:
        engine.pull(full[o[j] : o[j + 1]], stage.peer(j, (sizes[j], B, K), x_local.dtype), ws.flags, j, ws.epoch)
    out = engine.launch(launch, guards=[(full[o[j] : o[j + 1]], ws.flags, j, ws.epoch) for j in peers])
    engine.wait_pulls(TIMEOUT_S)
    engine.hand_off(_host_wait_s())  # the caller's torch ops read out and full
    return out.view(L, B, -1).transpose(0, 1), full.transpose(0, 1)


def _aligned(n: int, dtype: torch.dtype) -> int:
    step = ALIGN_BYTES // math.gcd(ALIGN_BYTES, dtype.itemsize)
    return -(-n // step) * step


def matmul_rs(x: torch.Tensor, w: torch.Tensor, sizes: list[int], pg, ring: Ring | None = None) -> torch.Tensor:
    """``reduce_scatter(x @ w)``; ``x: (B, L, K_r)``, ``w: (K_r, N)`` -> ``(B, L_r, N)``, a sequence-major view.

    ``ring`` changes nothing here: the producer writes each tile straight into its destination's slot, so no
    rank holds partial sums of its own; the receive slots (``world x L_r x N``) are what the one-shot
    reduction needs, allocated once per workspace and reused by every call.
    """
    world, rank = group_size(pg), group_rank(pg)
    B, L, K_r = x.shape
    N = w.shape[1]
    rows = [s * B for s in sizes]
    max_rows, row_stride = _rs_layout(max(rows), N, x.dtype)
    ws = _workspace(pg, "rs", x.dtype, x.device)
    data = ws.reserve(world * max_rows * row_stride)
    recv = data.local[: world * max_rows * row_stride].view(world, max_rows, row_stride)[:, :, :N]
    a = x.transpose(0, 1).reshape(L * B, K_r)  # a view when x is sequence-major
    epoch = ws.next_epoch()
    produce = odykernels.prepare_matmul_rs(
        a, w, rows, rank, recv, data.peer_offsets(), ws.flags, ws.flag_buffer.peer_offsets(), epoch,
        counters=ws.counters,
    ).compile()  # fmt: skip
    reduce = odykernels.prepare_reduce_slots(
        recv, ws.flags, rows, rank, epoch, out=x.new_empty(rows[rank], N), timeout_s=TIMEOUT_S, status=ws.status
    ).compile()

    data.barrier(0, TIMEOUT_S)  # every peer has reduced the previous call's slots: they may be overwritten
    slot = max_rows * row_stride
    pushes = [data.peer(j, (world * slot,), x.dtype)[rank * slot : (rank + 1) * slot] for j in range(world)]
    ws.transport.launch(produce, pushes=pushes)
    out = ws.transport.launch(reduce, guards=[(recv[s], ws.flags, s, epoch) for s in range(world)])
    ws.transport.hand_off(_host_wait_s())  # the caller's torch ops read out
    return out.view(sizes[rank], B, N).transpose(0, 1)


def gather_stream(x_local: torch.Tensor, sizes: list[int], pg, ring: Ring) -> Iterator[Piece]:
    """The gathered sequence piece by piece: this rank's chunk is staged in its symmetric buffer (the only
    copy of its size), then the copy engine pulls the peers' pieces into ``ring.slots`` local slots, each
    pulled again once its piece has been consumed (stream order: the pull waits for the consumer's work)."""
    rank = group_rank(pg)
    o = offsets(sizes)
    B, L_r, K = x_local.shape
    ws = _workspace(pg, "ag", x_local.dtype, x_local.device)
    stage = ws.reserve(max(sizes) * B * K)
    tokens = ring.piece_tokens(sizes)
    wanted = peer_pieces(sizes, rank, tokens)
    slots = x_local.new_empty(max(1, min(ring.slots, len(wanted))), tokens, B, K)

    stage.barrier(0, TIMEOUT_S)  # every peer has finished pulling this buffer's previous contents
    mine = stage.local[: L_r * B * K].view(L_r, B, K)
    ws.transport.copy(mine, x_local.transpose(0, 1))
    stage.barrier(1, TIMEOUT_S)  # every rank's own chunk is in place

    def pull(i: int):
        owner, t0, t1 = wanted[i]
        buf = slots[i % len(slots)][: t1 - t0]
        src = stage.peer(owner, (t1 - t0, B, K), x_local.dtype, offset=(t0 - o[owner]) * B * K)
        ws.transport.pull(buf, src)
        return ws.transport.mark(), buf

    pending = deque(pull(i) for i in range(min(len(slots), len(wanted))))
    ws.transport.hand_off(_host_wait_s())  # the consumer's torch ops read mine
    yield o[rank], o[rank + 1], mine
    for i, (_, t0, t1) in enumerate(wanted):
        token, buf = pending.popleft()
        ws.transport.wait(token, TIMEOUT_S)
        ws.transport.hand_off(_host_wait_s())  # ... and buf
        yield t0, t1, buf
        if i + len(slots) < len(wanted):
            pending.append(pull(i + len(slots)))
