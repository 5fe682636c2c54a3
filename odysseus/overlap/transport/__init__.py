"""Symmetric memory, a copy engine and barriers for the symm backend: one transport, two runtimes.

The symm backend (:mod:`odysseus.overlap.symm`) reaches the machine only through
:class:`~.device.DeviceTransport` and its :class:`~.device.DeviceBuffer`:

- **allocate and rendezvous** a buffer that every rank of a group holds and every rank can address
  (``allocate``, collective); a **peer's view** of it (``peer``) and **its offset** from this rank's
  buffer, for kernels that store into peers (``peer_offsets``);
- **a barrier** over the group in stream order, whose timeout is recorded, not trapped (``barrier``,
  ``check``);
- **an asynchronous pull** of a peer's chunk on the copy engine's stream, then a flag write (``pull``),
  and **ordering** the current stream after pulls (``mark``, ``wait``, ``wait_pulls``);
- **kernel launches and copies** on the current stream (``launch``, ``copy``), and the **hand-off** of
  their results to the host's next torch ops (``hand_off``).

The transport is written once (:mod:`.device`) over a small runtime interface (:mod:`.runtime`): on CUDA,
torch.cuda and torch symmetric memory (:mod:`.cuda_runtime`, one torch call per method); on CPU gloo ranks,
an emulation in shared memory whose streams are worker threads (:mod:`.emulated`). So the code that runs
on a GPU is the code the CPU tests run, except the runtime's own calls. What that proves and what it does
not is in docs/KERNELS.md ("What the CPU proves: transport").

Flags are uint32 words: the dtype ``stream_write_value32`` writes and the kernels wait on.
"""

from __future__ import annotations

import os

import torch

FLAG_DTYPE = torch.uint32

_TRANSPORTS: dict[torch.device, object] = {}
# A forked child inherits the parent's transports but not their threads or streams: it starts afresh.
os.register_at_fork(after_in_child=_TRANSPORTS.clear)


def transport_for(device: torch.device):
    """The :class:`~.device.DeviceTransport` of ``device`` (one per device, created on first use)."""
    from .device import DeviceTransport

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    found = _TRANSPORTS.get(device)
    if found is None:
        if device.type == "cuda":
            from .cuda_runtime import CudaRuntime

            found = DeviceTransport(CudaRuntime(device))
        elif device.type == "cpu":
            from .emulated import EmulatedRuntime

            found = DeviceTransport(EmulatedRuntime())
        else:
            raise ValueError(f"no symmetric-memory transport for {device}; expected a cuda or cpu device")
        _TRANSPORTS[device] = found
    return found
