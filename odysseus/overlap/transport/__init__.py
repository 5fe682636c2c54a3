"""Symmetric memory behind one small interface, so the symm backend runs the same code on CUDA and on CPU.

The symm backend (:mod:`odysseus.overlap.symm`) needs six things from the machine:

- **allocate and rendezvous** a buffer that every rank of a group holds and every rank can address
  (:meth:`Transport.allocate`, collective);
- **a peer's view** of it, to copy from, and **its offset** from this rank's buffer, for kernels that
  store into peers (:meth:`SymmetricBuffer.peer`, :meth:`SymmetricBuffer.peer_offsets`);
- **a barrier** over the group, bounded by a timeout (:meth:`SymmetricBuffer.barrier`);
- **an asynchronous pull** of a peer's chunk into a local tensor followed by a flag write, on a copy engine
  (:meth:`Transport.pull`), and **waiting for the pulls**: all of them (:meth:`Transport.wait_pulls`) or
  those issued before a mark (:meth:`Transport.mark`, :meth:`Transport.wait`);
- **writing a flag** in stream order (:meth:`Transport.write_flag`).

Two implementations: :mod:`.cuda` (torch symmetric memory, copy-engine copies on a side stream) and
:mod:`.cpu` (shared memory that every forked rank maps, a worker thread as the copy engine, barriers on
shared counters). The CPU one enforces every precondition of the CUDA call it stands in for, so code that
passes on the CPU does not crash on its first CUDA call for a reason the CPU could have seen. What it does
not prove is in docs/KERNELS.md ("The transport seam").

Flags are uint32 words: the dtype ``stream_write_value32`` writes and the kernels wait on.
"""

from __future__ import annotations

import abc
import os

import torch

FLAG_DTYPE = torch.uint32


class SymmetricBuffer(abc.ABC):
    """A flat buffer of ``numel`` elements of ``dtype`` on every rank of a group, addressable by every rank."""

    rank: int
    world: int
    numel: int
    dtype: torch.dtype
    local: torch.Tensor
    """This rank's buffer, flat ``(numel,)``."""

    @abc.abstractmethod
    def peer(self, rank: int, shape: tuple[int, ...], dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
        """Rank ``rank``'s buffer viewed as a contiguous ``shape`` of ``dtype``, ``offset`` elements in."""

    @abc.abstractmethod
    def peer_offsets(self) -> torch.Tensor:
        """int64 ``(world,)`` on the buffer's device: element offsets of every rank's buffer from this one's."""

    @abc.abstractmethod
    def barrier(self, channel: int, timeout_s: float) -> None:
        """Wait, in stream order, until every rank of the group has reached this barrier on ``channel``."""


class Transport(abc.ABC):
    """How one device reaches symmetric memory and its copy engine."""

    @abc.abstractmethod
    def preflight(self) -> None:
        """Raise if this rank cannot use symmetric memory at all (local checks only: no peer is involved)."""

    @abc.abstractmethod
    def allocate(self, pg, numel: int, dtype: torch.dtype) -> SymmetricBuffer:
        """A zeroed :class:`SymmetricBuffer` on every rank of ``pg`` (collective: every rank calls it)."""

    @abc.abstractmethod
    def pull(
        self, dst: torch.Tensor, src: torch.Tensor, flags: torch.Tensor | None = None, index: int = 0, value: int = 0
    ) -> None:
        """Copy ``src`` (a peer's view) into ``dst`` on the copy engine, then (if given) set ``flags[index] = value``.

        Asynchronous: ordered after the work the current stream holds now (so ``dst`` may be memory that work
        still reads), and before the flag write. Issue every pull before launching a kernel that waits on
        their flags.
        """

    @abc.abstractmethod
    def mark(self) -> object:
        """A token for the pulls issued so far, for :meth:`wait`."""

    @abc.abstractmethod
    def wait(self, token: object, timeout_s: float) -> None:
        """Order the current stream after the pulls issued before ``token`` was taken."""

    def wait_pulls(self, timeout_s: float) -> None:
        """Order the current stream after every pull issued so far (bounded by ``timeout_s`` where the host waits)."""
        self.wait(self.mark(), timeout_s)

    @abc.abstractmethod
    def write_flag(self, flags: torch.Tensor, index: int, value: int) -> None:
        """Set ``flags[index] = value`` in the current stream's order, without using compute cores."""


_TRANSPORTS: dict[torch.device, Transport] = {}
# A forked child inherits the parent's transports but not their threads or streams: it starts afresh.
os.register_at_fork(after_in_child=_TRANSPORTS.clear)


def transport_for(device: torch.device) -> Transport:
    """The transport of ``device`` (one per device, created on first use)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    found = _TRANSPORTS.get(device)
    if found is None:
        if device.type == "cuda":
            from .cuda import CudaTransport

            found = CudaTransport(device)
        elif device.type == "cpu":
            from .cpu import CpuTransport

            found = CpuTransport()
        else:
            raise ValueError(f"no symmetric-memory transport for {device}; expected a cuda or cpu device")
        _TRANSPORTS[device] = found
    return found
