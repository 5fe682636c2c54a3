"""The transport: symmetric buffers, copy-engine pulls on a side stream, stream-ordered flags and barriers.

Written once, over :class:`~.runtime.Runtime`: on CUDA every runtime call is one torch call
(:mod:`.cuda_runtime`); on CPU gloo ranks the same code runs over :mod:`.emulated`, whose streams are
threads, so what ``pytest -k symm`` runs is this file line for line. Every call goes through the checks
of :mod:`.contract` first, so a violation is reported with torch's message in both runtimes.

Barriers are :mod:`odykernels.barrier` kernels on the allocation's signal pad, queued on the current stream:
a timeout is recorded in the status record the buffer's owner passes (and raised when the owner checks it),
never a device trap, so a dead peer costs a ``TimeoutError`` on CUDA as on the CPU.
"""

from __future__ import annotations

import torch

import odykernels.barrier as barrier
from odykernels.signal import new_status

from ...comm.groups import group_rank, group_size
from .contract import check_get_buffer, check_memcpy, check_write_value32
from .runtime import Guard, Runtime

BARRIER_START = 0
"""The barrier epoch before a buffer's first barrier on each channel (tests start near the wrap)."""


class DeviceBuffer:
    """A symmetric allocation rendezvoused over ``pg``, with a barrier on its signal pad."""

    def __init__(self, rt: Runtime, pg, numel: int, dtype: torch.dtype, timeout_s: float, status: torch.Tensor):
        self.rt, self.numel, self.dtype = rt, numel, dtype
        self.rank, self.world = group_rank(pg), group_size(pg)
        self.nbytes = numel * dtype.itemsize
        # Zeroed by hand: from torch 2.14 on, symm_mem.empty zeroes only the signal pad (SYMM_CONTRACT §1).
        self.local = rt.symm_empty(numel, dtype).zero_()
        self.handle = rt.rendezvous(self.local, pg)
        if self.handle is None:  # torch returns None, not an error, when it cannot map the tensor (§2)
            raise RuntimeError(f"symmetric memory: rendezvous of a {self.nbytes}-byte buffer on {rt.device} failed")
        ptrs, es = self.handle.buffer_ptrs, dtype.itemsize
        self._offsets = torch.tensor([(p - ptrs[self.rank]) // es for p in ptrs], dtype=torch.int64, device=rt.device)
        self.pad = self.handle.get_signal_pad(self.rank)
        pads = [self.handle.get_signal_pad(r).data_ptr() for r in range(self.world)]
        self._pad_offsets = torch.tensor(
            [(p - pads[self.rank]) // 4 for p in pads], dtype=torch.int64, device=rt.device
        )
        self.status = status
        self._epochs = [BARRIER_START] * barrier.channels(self.pad, self.world)
        # Compiled now, not in a call: a first-call compile would eat the peers' wait budget.
        self._barrier(0, barrier.next_epoch(BARRIER_START), timeout_s).compile()
        # Zeroed memory is visible to peers before any of them writes into it.
        rt.synchronize(rt.current_stream(), timeout_s)

    def peer(self, rank: int, shape: tuple[int, ...], dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
        check_get_buffer(rank, self.world, shape, dtype, offset, self.nbytes)
        return self.handle.get_buffer(rank, list(shape), dtype, offset)

    def peer_offsets(self) -> torch.Tensor:
        return self._offsets

    def _barrier(self, channel: int, epoch: int, timeout_s: float):
        return barrier.prepare_barrier(
            self.pad, self._pad_offsets, self.rank, channel, epoch, timeout_s=timeout_s, status=self.status
        )

    def barrier(self, channel: int, timeout_s: float) -> None:
        """Queue a barrier over the group on ``channel`` on the current stream: work queued after it runs once
        every rank's stream has reached it (or its wait gave up, recorded in :attr:`status`)."""
        epoch = barrier.next_epoch(self._epochs[channel] if 0 <= channel < len(self._epochs) else 0)
        launch = self._barrier(channel, epoch, timeout_s)  # checks the channel
        self._epochs[channel] = epoch
        self.rt.launch(launch)


class DeviceTransport:
    """Symmetric memory on one device, with one side stream as the copy engine's queue.

    ``delay_s`` (tests only) holds the copy stream that long before each pull, so kernels really wait on
    flags that arrive during the wait. ``bytes_pulled`` counts the bytes of the pulls issued.
    """

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.device = rt.device
        self.copy_stream = rt.new_stream()
        self.delay_s = 0.0
        self.bytes_pulled = 0

    def preflight(self, devices: list[int]) -> None:
        """Raise if this rank cannot use symmetric memory with the group's ``devices`` (:meth:`device_id` of
        every rank): local checks, then peer access both ways for every pair that involves this device."""
        self.rt.check_symmetric_memory()
        # A pull between devices without peer access runs on the SMs, queued behind the kernel that waits for it.
        me = self.rt.device_id()
        for peer in devices:
            if peer != me and not (self.rt.can_access_peer(me, peer) and self.rt.can_access_peer(peer, me)):
                raise RuntimeError(f"device {me} and device {peer} of the group have no peer access to each other")

    def device_id(self) -> int:
        """This process's device, as :meth:`preflight` numbers the group's devices."""
        return self.rt.device_id()

    def allocate(
        self, pg, numel: int, dtype: torch.dtype, timeout_s: float, status: torch.Tensor | None = None
    ) -> DeviceBuffer:
        """A zeroed buffer on every rank of ``pg`` (collective); its barriers record timeouts in ``status``."""
        status = new_status(self.device) if status is None else status
        return DeviceBuffer(self.rt, pg, numel, dtype, timeout_s, status)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst.copy_(src)`` on the current stream."""
        self.rt.copy(dst, src)

    def pull(
        self, dst: torch.Tensor, src: torch.Tensor, flags: torch.Tensor | None = None, index: int = 0, value: int = 0
    ) -> None:
        """Copy ``src`` (a peer's view) into ``dst`` on the copy engine, then (if given) set ``flags[index] = value``.

        Asynchronous: ordered after the work the current stream holds now (so ``dst`` may be memory that work
        still reads), and before the flag write. Issue every pull before launching a kernel that waits on
        their flags.
        """
        check_memcpy(dst, src)
        if flags is not None:
            check_write_value32(flags, index, value)
        self.rt.wait_stream(self.copy_stream, self.rt.current_stream())
        with self.rt.use_stream(self.copy_stream):
            if self.delay_s:
                self.rt.sleep(self.delay_s)
            self.rt.copy(dst, src)
            if flags is not None:
                self.write_flag(flags, index, value)
        self.bytes_pulled += dst.nbytes

    def mark(self) -> object:
        """A token for the pulls issued so far, for :meth:`wait`."""
        return self.rt.record_event(self.copy_stream)

    def wait(self, token: object, timeout_s: float) -> None:
        """Order the current stream after the pulls issued before ``token`` (:meth:`mark`) was taken."""
        # Stream order, not a host wait: the kernels that consume the pulls bound their own waits.
        self.rt.wait_event(self.rt.current_stream(), token)

    def wait_pulls(self, timeout_s: float) -> None:
        """Order the current stream after every pull issued so far."""
        self.wait(self.mark(), timeout_s)

    def write_flag(self, flags: torch.Tensor, index: int, value: int) -> None:
        """Set ``flags[index] = value`` in the current stream's order, without using compute cores."""
        if self.rt.is_capturing():
            # Stream memory operations cannot be captured in a CUDA graph; a one-word memset can (as torch's
            # own async-TP does).
            check_write_value32(flags, index, value, count=1)
            self.rt.memset32(flags, index, value, 1)
        else:
            # cuStreamWriteValue32 issues a system-level fence before the write: the pull is visible first.
            check_write_value32(flags, index, value)
            self.rt.stream_write_value32(flags, index, value)

    def launch(self, launch, guards: list[Guard] = (), pushes: list[torch.Tensor] = ()) -> torch.Tensor | None:
        """Queue ``launch`` (an ``odykernels`` Launch) on the current stream; returns its output, written in
        stream order. ``guards``/``pushes``: see :meth:`.runtime.Runtime.launch`."""
        self.rt.launch(launch, guards, pushes)
        return launch.out

    def hand_off(self, timeout_s: float) -> None:
        """Make the current stream's work visible to the host's next torch ops (see the runtime's)."""
        self.rt.hand_off(timeout_s)
