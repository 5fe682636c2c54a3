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
        # Zeroed by hand: from torch 2.14 on, symm_mem.empty zeroes only the signal pad (SYMM_CONTRACT §1).
        self.local = symm_mem.empty(numel, dtype=dtype, device=device).zero_()
        self.handle = symm_mem.rendezvous(self.local, pg.group_name)
        if self.handle is None:  # torch returns None, not an error, when it cannot map the tensor (§2)
            raise RuntimeError(f"symmetric memory: rendezvous of a {self.nbytes}-byte buffer on {device} failed")
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
    """Symmetric memory on one CUDA device, with one side stream as the copy engine's queue.

    ``delay_s`` (tests only) holds the copy stream that long before each pull, so kernels really wait on
    flags that arrive during the wait.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        self.delay_s = 0.0

    def preflight(self) -> None:
        import torch.distributed._symmetric_memory as symm_mem
        from torch.distributed._symmetric_memory import _SymmetricMemory

        if not hasattr(_SymmetricMemory, "stream_write_value32"):  # torch >= 2.6 (SYMM_CONTRACT §6)
            raise RuntimeError(f"torch {torch.__version__} lacks _SymmetricMemory.stream_write_value32")
        symm_mem.empty(1, dtype=torch.uint8, device=self.device)  # a local allocation: no peer involved

    def allocate(self, pg, numel: int, dtype: torch.dtype) -> CudaBuffer:
        return CudaBuffer(pg, numel, dtype, self.device)

    def pull(
        self, dst: torch.Tensor, src: torch.Tensor, flags: torch.Tensor | None = None, index: int = 0, value: int = 0
    ) -> None:
        check_memcpy(dst, src)

        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            if self.delay_s:
                torch.cuda._sleep(int(self.delay_s * 2e9))  # cycles at about 2 GHz
            dst.copy_(src)  # contiguous and same dtype: cudaMemcpyAsync, on a copy engine
            if flags is not None:
                self.write_flag(flags, index, value)

    def mark(self) -> torch.cuda.Event:
        return self.copy_stream.record_event()

    def wait(self, token: torch.cuda.Event, timeout_s: float) -> None:
        # Stream order, not a host wait: the kernels that consume the pulls bound their own waits.
        torch.cuda.current_stream(self.device).wait_event(token)

    def write_flag(self, flags: torch.Tensor, index: int, value: int) -> None:
        from torch.distributed._symmetric_memory import _SymmetricMemory

        if torch.cuda.is_current_stream_capturing():
            # Stream memory operations cannot be captured in a CUDA graph; a one-word memset can (as torch's
            # own async-TP does).
            check_write_value32(flags, index, value, count=1)
            _SymmetricMemory.memset32(flags, index, value, 1)
        else:
            # cuStreamWriteValue32 issues a system-level fence before the write: the pull is visible first.
            check_write_value32(flags, index, value)
            _SymmetricMemory.stream_write_value32(flags, index, value)
