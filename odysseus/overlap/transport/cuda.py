"""CUDA transport: torch symmetric memory, copy-engine pulls on a side stream, stream-ordered flag writes.

Every call goes through the checks of :mod:`.contract` first, the same the CPU transport enforces, so a
violation is reported here with the same message as on the CPU.
"""

from __future__ import annotations

import torch

from ...comm.groups import group_rank, group_size
from . import SymmetricBuffer, Transport
from .contract import check_barrier_channel, check_get_buffer, check_memcpy, check_write_value32


class CudaBuffer(SymmetricBuffer):
    """A ``symm_mem.empty`` allocation rendezvoused over ``pg``."""

    def __init__(self, pg, numel: int, dtype: torch.dtype, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        self.numel, self.dtype = numel, dtype
        self.rank, self.world = group_rank(pg), group_size(pg)
        self.nbytes = numel * dtype.itemsize
        self.local = symm_mem.empty(numel, dtype=dtype, device=device).zero_()
        self.handle = symm_mem.rendezvous(self.local, pg.group_name)
        ptrs, es = self.handle.buffer_ptrs, dtype.itemsize
        self._offsets = torch.tensor([(p - ptrs[self.rank]) // es for p in ptrs], dtype=torch.int64, device=device)
        # Zeroed memory is visible to peers before any of them writes into it.
        torch.cuda.current_stream(device).synchronize()

    def peer(self, rank: int, shape: tuple[int, ...], dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
        check_get_buffer(rank, self.world, shape, dtype, offset, self.nbytes)
        return self.handle.get_buffer(rank, list(shape), dtype, offset)

    def peer_offsets(self) -> torch.Tensor:
        return self._offsets

    def barrier(self, channel: int, timeout_s: float) -> None:
        # A timeout here is fatal: torch's barrier kernel traps the device (see docs/KERNELS.md).
        check_barrier_channel(channel, self.world)
        self.handle.barrier(channel=channel, timeout_ms=max(1, int(timeout_s * 1000)))


class CudaTransport(Transport):
    """Symmetric memory on one CUDA device, with one side stream as the copy engine's queue."""

    def __init__(self, device: torch.device):
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)

    def allocate(self, pg, numel: int, dtype: torch.dtype) -> CudaBuffer:
        return CudaBuffer(pg, numel, dtype, self.device)

    def pull(self, dst: torch.Tensor, src: torch.Tensor, flags: torch.Tensor, index: int, value: int) -> None:
        check_memcpy(dst, src)
        check_write_value32(flags, index, value)
        from torch.distributed._symmetric_memory import _SymmetricMemory

        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src)  # contiguous and same dtype: cudaMemcpyAsync, on a copy engine
            # cuStreamWriteValue32 orders the write after the copy (a system-level fence first).
            _SymmetricMemory.stream_write_value32(flags, index, value)

    def wait_pulls(self, timeout_s: float) -> None:
        # Stream order, not a host wait: the kernels that consume the pulls bound their own waits.
        torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)

    def write_flag(self, flags: torch.Tensor, index: int, value: int) -> None:
        check_write_value32(flags, index, value)
        from torch.distributed._symmetric_memory import _SymmetricMemory

        _SymmetricMemory.stream_write_value32(flags, index, value)
