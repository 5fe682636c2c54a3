"""CPU stand-in for CUDA symmetric memory, for gloo ranks forked on one machine.

Every rank creates its buffer as a file in ``/dev/shm`` and maps the files of all its peers (``MAP_SHARED``),
so a kernel run by the Triton interpreter reads and writes a peer's memory through an integer offset from
its own buffer, exactly as the compiled kernels do through CUDA's peer mappings, and a flag one process
sets is seen by another process spinning on it. The copy engine is a worker thread that runs the pulls in
order, each a memcpy followed by a flag write. Barriers are shared-memory signal words laid out as CUDA's
signal pads, waited on with a deadline.

Each method enforces the preconditions of the CUDA call it stands in for, read in torch's source
(pytorch/pytorch, ``torch/csrc/distributed/c10d/symm_mem/``; see :mod:`.contract`). A test that passes
here therefore does not crash on the GPU for a dtype, shape, bounds or contiguity reason.

After each launch the interpreter copies every argument's storage "back" onto itself; torch skips a copy
of a tensor onto its own memory (``copy_impl``'s ``is_same_data``), so this never rewrites words a peer is
writing at that moment.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import torch
import torch.distributed as dist

from ...comm.groups import group_rank, group_size, meta_group
from . import FLAG_DTYPE, SymmetricBuffer, Transport
from .contract import (
    SIGNAL_PAD_BYTES,
    check_barrier_channel,
    check_get_buffer,
    check_memcpy,
    check_rendezvous_sizes,
    check_write_value32,
)

SHM_DIR = "/dev/shm"


def _map(path: str, nbytes: int) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


class CpuBuffer(SymmetricBuffer):
    """``numel`` elements of ``dtype`` per rank, plus a signal pad, in files every rank of ``pg`` maps."""

    def __init__(self, pg, numel: int, dtype: torch.dtype):
        self.pg, self.numel, self.dtype = pg, numel, dtype
        self.rank, self.world = group_rank(pg), group_size(pg)
        self.nbytes = numel * dtype.itemsize
        # Page-aligned data first, then the signal pad: as CUDA allocations, both start 16-byte aligned.
        pad_at = -(-self.nbytes // 4096) * 4096
        mine = os.path.join(SHM_DIR, f"odysseus-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        with open(mine, "wb") as f:
            f.truncate(pad_at + SIGNAL_PAD_BYTES)
        try:
            found: list[tuple[str, int] | None] = [None] * self.world
            dist.all_gather_object(found, (mine, self.nbytes), group=meta_group(pg))
            check_rendezvous_sizes([n for _, n in found])
            maps = [_map(name, pad_at + SIGNAL_PAD_BYTES) for name, _ in found]
            dist.barrier(group=meta_group(pg))  # every rank has mapped every file before any is unlinked
        finally:
            os.unlink(mine)  # the mappings outlive the name; nothing is left in /dev/shm
        self._data = [m[: self.nbytes] for m in maps]
        self._pads = [m[pad_at:].view(FLAG_DTYPE) for m in maps]
        self.local = self._data[self.rank].view(dtype)
        self._offsets = torch.tensor(
            [(d.data_ptr() - self._data[self.rank].data_ptr()) // dtype.itemsize for d in self._data],
            dtype=torch.int64,
        )

    def peer(self, rank: int, shape: tuple[int, ...], dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
        count = check_get_buffer(rank, self.world, shape, dtype, offset, self.nbytes)
        start = offset * dtype.itemsize
        return self._data[rank][start : start + count * dtype.itemsize].view(dtype).view(shape)

    def peer_offsets(self) -> torch.Tensor:
        return self._offsets

    def barrier(self, channel: int, timeout_s: float) -> None:
        """CUDA's barrier on signal pads: put a 1 in every peer's slot for me, take a 1 from mine for each."""
        check_barrier_channel(channel, self.world)
        base = channel * self.world
        deadline = time.monotonic() + timeout_s
        peers = [j for j in range(self.world) if j != self.rank]
        # put_signal: the slot must have been consumed (0) before it is raised again, as CUDA's CAS 0 -> 1.
        self._spin(lambda j: self._pads[j][base + self.rank] == 0, peers, deadline, timeout_s, channel, "consume")
        for j in peers:
            self._pads[j][base + self.rank].fill_(1)
        # wait_signal: CAS 1 -> 0 on my slot for each peer.
        self._spin(lambda j: self._pads[self.rank][base + j] == 1, peers, deadline, timeout_s, channel, "arrive")
        for j in peers:
            self._pads[self.rank][base + j].fill_(0)

    def _spin(self, ready, peers: list[int], deadline: float, timeout_s: float, channel: int, what: str) -> None:
        waiting = list(peers)
        while waiting:
            waiting = [j for j in waiting if not bool(ready(j))]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"symmetric-memory barrier: rank {self.rank} waited {timeout_s:g} s on channel {channel} for "
                    f"rank(s) {waiting} to {what} (their chunks {waiting} of this call never became available)"
                )
            time.sleep(50e-6)


class CpuTransport(Transport):
    """The CPU transport of one process: shared-memory buffers and a worker thread as the copy engine.

    ``delay_s`` (tests only) delays every pull, so kernels really wait on flags that arrive during the
    wait. ``bytes_pulled`` counts what the copy engine moved.
    """

    def __init__(self):
        self.delay_s = 0.0
        self.bytes_pulled = 0
        self._cv = threading.Condition()
        self._queue: list[tuple] = []
        self._issued = self._done = 0  # pulls queued and finished, ever
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def preflight(self) -> None:
        if not (os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)):
            raise RuntimeError(f"the CPU symmetric-memory transport needs a writable {SHM_DIR}")

    def allocate(self, pg, numel: int, dtype: torch.dtype) -> CpuBuffer:
        return CpuBuffer(pg, numel, dtype)

    def pull(
        self, dst: torch.Tensor, src: torch.Tensor, flags: torch.Tensor | None = None, index: int = 0, value: int = 0
    ) -> None:
        check_memcpy(dst, src)
        if flags is not None:
            check_write_value32(flags, index, value)
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="odysseus-copy-engine", daemon=True)
                self._thread.start()
            self._queue.append((dst, src, flags, index, value))
            self._issued += 1
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                dst, src, flags, index, value = self._queue.pop(0)
            try:
                if self.delay_s:
                    time.sleep(self.delay_s)
                dst.copy_(src)
                # Stores stay in order on x86 (TSO), and the interpreter reads the flag before the rows.
                if flags is not None:
                    flags[index].fill_(value)
                self.bytes_pulled += dst.nbytes
            except BaseException as err:  # noqa: BLE001 - handed to the thread that waits for the pulls
                self._error = self._error or err
            with self._cv:
                self._done += 1
                self._cv.notify_all()

    def mark(self) -> int:
        with self._cv:
            return self._issued

    def wait(self, token: int, timeout_s: float) -> None:
        # The CPU "stream" is this thread: ordering after the pulls means waiting for them here.
        with self._cv:
            if not self._cv.wait_for(lambda: self._done >= token, timeout=timeout_s):
                late = token - self._done
                raise TimeoutError(f"copy engine: {late} pull(s) still running after {timeout_s:g} s")
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"copy engine: a pull failed: {err}") from err

    def write_flag(self, flags: torch.Tensor, index: int, value: int) -> None:
        check_write_value32(flags, index, value)
        flags[index].fill_(value)
