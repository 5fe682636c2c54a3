"""What the transport takes from the machine: streams, events, symmetric memory, stream-ordered writes.

One interface, two runtimes. :mod:`.cuda_runtime` maps every method to one torch call on CUDA (torch symmetric
memory, ``torch.cuda`` streams and events). :mod:`.emulated` runs the same methods on CPU gloo ranks: shared
memory that every forked rank maps, and one worker thread per stream that runs its queued work in order, so
an enqueue returns to the host at once and only events, ``wait_stream``/``wait_event`` and synchronizes order
work, as on CUDA. The transport (:mod:`.device`) is written once, over this interface.

Every method with a torch counterpart has its contract in docs/SYMM_CONTRACT.md (section numbers below);
:mod:`.contract` checks it before the call, in both runtimes.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence

import torch

Guard = tuple[torch.Tensor, torch.Tensor, int, int]
"""``(region, flags, index, value)``: a kernel may read ``region`` only after it acquired ``flags[index] == value``."""


class Runtime(abc.ABC):
    """The calls the transport makes on one device. Streams and events are opaque to it."""

    device: torch.device

    # --- the machine
    @abc.abstractmethod
    def device_id(self) -> int:
        """This process's device, as ``can_access_peer`` numbers devices."""

    @abc.abstractmethod
    def can_access_peer(self, device: int, peer: int) -> bool:
        """Whether ``device`` can map ``peer``'s memory (``torch.cuda.can_device_access_peer``)."""

    @abc.abstractmethod
    def check_symmetric_memory(self) -> None:
        """Raise if this process cannot allocate symmetric memory at all (local, no peer involved)."""

    # --- streams and events
    @abc.abstractmethod
    def new_stream(self) -> object:
        """A new stream of this device."""

    @abc.abstractmethod
    def current_stream(self) -> object:
        """The stream the host's work is queued on now."""

    @abc.abstractmethod
    def use_stream(self, stream) -> contextlib.AbstractContextManager:
        """Make ``stream`` current inside the ``with`` block."""

    @abc.abstractmethod
    def record_event(self, stream) -> object:
        """An event that completes when the work queued on ``stream`` so far has run."""

    @abc.abstractmethod
    def wait_event(self, stream, event) -> None:
        """Work queued on ``stream`` after this runs after ``event`` completes."""

    @abc.abstractmethod
    def wait_stream(self, stream, other) -> None:
        """Work queued on ``stream`` after this runs after the work queued on ``other`` so far."""

    @abc.abstractmethod
    def synchronize(self, stream, timeout_s: float) -> None:
        """The host waits for ``stream``'s queued work (``TimeoutError`` after ``timeout_s`` where it can)."""

    @abc.abstractmethod
    def hand_off(self, timeout_s: float) -> None:
        """Make the current stream's work visible to the torch ops the host issues next.

        On CUDA those ops are queued on the same stream, so nothing is needed; on the emulated runtime they
        run on the host at once, which must first wait for the stream (bounded by ``timeout_s``).
        """

    @abc.abstractmethod
    def is_capturing(self) -> bool:
        """Whether the current stream is being captured into a CUDA graph."""

    # --- symmetric memory (SYMM_CONTRACT §1-4)
    @abc.abstractmethod
    def symm_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised symmetric allocation of ``numel`` elements (§1)."""

    @abc.abstractmethod
    def rendezvous(self, tensor: torch.Tensor, pg):
        """The handle of ``tensor`` over ``pg`` (collective; §2): ``buffer_ptrs``, ``get_buffer``,
        ``get_signal_pad``; None where the tensor cannot be mapped."""

    # --- stream-ordered work on the current stream
    @abc.abstractmethod
    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst.copy_(src)``."""

    @abc.abstractmethod
    def stream_write_value32(self, flags: torch.Tensor, index: int, value: int) -> None:
        """``flags[index] = value`` without compute cores, after a system fence (§6)."""

    @abc.abstractmethod
    def memset32(self, flags: torch.Tensor, index: int, value: int, count: int) -> None:
        """``flags[index : index + count] = value`` (a one-word kernel, capturable; §7)."""

    @abc.abstractmethod
    def sleep(self, seconds: float) -> None:
        """Hold the current stream (tests: late transfers)."""

    @abc.abstractmethod
    def launch(self, launch, guards: Sequence[Guard] = (), pushes: Sequence[torch.Tensor] = ()) -> None:
        """Queue an ``odykernels`` launch.

        ``guards`` and ``pushes`` only annotate it for the emulated runtime's race detector (:mod:`odykernels.race`):
        the kernel reads each guard's region after acquiring its flag, and writes into each pushed (peer)
        tensor, which is poisoned first.
        """
