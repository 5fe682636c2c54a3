"""The emulated runtime: CUDA's streams and symmetric memory on CPU gloo ranks forked on one machine.

**Memory.** Every rank creates each symmetric allocation as a file in ``/dev/shm`` (data, then a signal pad,
as torch 2.11 lays them out) and maps the files of all its peers (``MAP_SHARED``), so a kernel run by the
Triton interpreter reads and writes a peer's memory through an integer offset from its own buffer, exactly
as compiled kernels do through CUDA's peer mappings, and a word one process sets is seen by another process
spinning on it.

**Streams.** Each stream is a worker thread that runs its queued work in order: interpreted kernel launches,
copies, flag writes, sleeps, waits on events. An enqueue returns to the host at once; only events,
``wait_stream``/``wait_event`` and host synchronizes order work between streams and the host, as on CUDA. A
wait on an event is bounded (:data:`WAIT_S`); a failure inside a stream is raised by the next synchronize of
that stream or of any stream that waited on it.

**Race detector** (:mod:`odykernels.race`): every copy marks its destination pending until it has run and
poisons it (NaN) first; a launch's guards are checked on every load and on every flag write queued while
it waits (no chunk of it published while a transfer into it is pending), and the peer memory it pushes
into is poisoned before it runs. ``copy_jitter_s`` (tests) delays every copy by a random time from ``rng``.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
import uuid
from collections import deque

import torch
import torch.distributed as dist

from odykernels import race

from ...comm.groups import group_rank, group_size, meta_group
from . import FLAG_DTYPE
from .contract import SIGNAL_PAD_BYTES, check_get_buffer, check_rendezvous_sizes
from .runtime import Runtime

SHM_DIR = "/dev/shm"
WAIT_S = 600.0
"""Bound on a stream's wait for an event (the work it waits for bounds its own waits far below this)."""


class Stream:
    """A worker thread and its queue. ``enqueued``/``done`` count the work items ever queued and finished."""

    def __init__(self, name: str):
        self.name = name
        self.cv = threading.Condition()
        self.queue: deque = deque()
        self.enqueued = self.done = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"odysseus-stream-{name}", daemon=True)
        self.thread.start()

    def put(self, work) -> None:
        with self.cv:
            self.queue.append(work)
            self.enqueued += 1
            self.cv.notify_all()

    def _run(self) -> None:
        # Device work is outside autograd (grad mode is per thread: the host's no_grad views reach here).
        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.queue)
                work = self.queue.popleft()
            try:
                work()
            except BaseException as err:  # noqa: BLE001 - raised by the host's next synchronize
                self.error = self.error or err
            with self.cv:
                self.done += 1
                self.cv.notify_all()

    def wait_done(self, count: int, timeout_s: float) -> bool:
        with self.cv:
            return self.cv.wait_for(lambda: self.done >= count, timeout=timeout_s)


class Event:
    """Completes when ``stream`` has finished its first ``count`` work items."""

    def __init__(self, stream: Stream, count: int):
        self.stream, self.count = stream, count


class Handle:
    """What ``rendezvous`` returns: every rank's data and signal pad, mapped here."""

    def __init__(self, rank: int, data: list[torch.Tensor], pads: list[torch.Tensor], nbytes: int):
        self.rank, self.world_size, self.buffer_size = rank, len(data), nbytes
        self._data, self._pads = data, pads
        self.buffer_ptrs = [d.data_ptr() for d in data]
        self.signal_pad_ptrs = [p.data_ptr() for p in pads]

    def get_buffer(self, rank: int, sizes, dtype: torch.dtype, storage_offset: int = 0) -> torch.Tensor:
        count = check_get_buffer(rank, self.world_size, tuple(sizes), dtype, storage_offset, self.buffer_size)
        start = storage_offset * dtype.itemsize
        return self._data[rank][start : start + count * dtype.itemsize].view(dtype).view(list(sizes))

    def get_signal_pad(self, rank: int) -> torch.Tensor:
        return self._pads[rank]


def _map(path: str, nbytes: int) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def _pad_at(nbytes: int) -> int:
    return -(-nbytes // 4096) * 4096  # page-aligned data, then the pad: both 16-byte aligned, as on CUDA


class EmulatedRuntime(Runtime):
    """The runtime of one CPU process. ``refused_peers`` (tests): device pairs that cannot access each other."""

    def __init__(self):
        self.device = torch.device("cpu")
        self.refused_peers: set[tuple[int, int]] = set()
        self.copy_jitter_s = 0.0
        self.rng = random.Random(0)
        self._files: dict[int, tuple[str, torch.Tensor]] = {}  # data pointer -> (file, whole mapping)
        self._local = threading.local()
        self._default: Stream | None = None
        self._streams = 0

    def device_id(self) -> int:
        return dist.get_rank()

    def can_access_peer(self, device: int, peer: int) -> bool:
        return (device, peer) not in self.refused_peers

    def check_symmetric_memory(self) -> None:
        if not (os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)):
            raise RuntimeError(f"the emulated symmetric-memory runtime needs a writable {SHM_DIR}")

    # --- streams and events
    def new_stream(self) -> Stream:
        self._streams += 1
        return Stream(str(self._streams))

    def current_stream(self) -> Stream:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            if self._default is None:
                self._default = self.new_stream()
            stream = self._default
        return stream

    @contextlib.contextmanager
    def use_stream(self, stream: Stream):
        before = getattr(self._local, "stream", None)
        self._local.stream = stream
        try:
            yield
        finally:
            self._local.stream = before

    def record_event(self, stream: Stream) -> Event:
        with stream.cv:
            return Event(stream, stream.enqueued)

    def wait_event(self, stream: Stream, event: Event) -> None:
        def wait():
            if not event.stream.wait_done(event.count, WAIT_S):
                raise TimeoutError(
                    f"stream {stream.name}: waited {WAIT_S:g} s for an event of stream {event.stream.name}"
                )
            if event.stream.error is not None:  # a failure travels along the dependency, as a sticky CUDA error
                raise RuntimeError(f"stream {event.stream.name} failed: {event.stream.error}") from event.stream.error

        stream.put(wait)

    def wait_stream(self, stream: Stream, other: Stream) -> None:
        self.wait_event(stream, self.record_event(other))

    def synchronize(self, stream: Stream, timeout_s: float) -> None:
        with stream.cv:
            count = stream.enqueued
        if not stream.wait_done(count, timeout_s):
            raise TimeoutError(f"stream {stream.name}: its work was still running after {timeout_s:g} s")
        if stream.error is not None:
            err, stream.error = stream.error, None
            raise err

    def hand_off(self, timeout_s: float) -> None:
        self.synchronize(self.current_stream(), timeout_s)

    def is_capturing(self) -> bool:
        return False

    # --- symmetric memory
    def symm_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        path = os.path.join(SHM_DIR, f"odysseus-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        with open(path, "wb") as f:
            f.truncate(_pad_at(nbytes) + SIGNAL_PAD_BYTES)
        whole = _map(path, _pad_at(nbytes) + SIGNAL_PAD_BYTES)
        data = whole[:nbytes].view(dtype)
        self._files[data.data_ptr()] = (path, whole)
        return data

    def rendezvous(self, tensor: torch.Tensor, pg) -> Handle | None:
        if tensor.data_ptr() not in self._files:  # as torch: None where the tensor is no symmetric allocation
            return None
        path, whole = self._files.pop(tensor.data_ptr())
        nbytes, rank = tensor.numel() * tensor.element_size(), group_rank(pg)
        try:
            found: list[tuple[str, int] | None] = [None] * group_size(pg)
            dist.all_gather_object(found, (path, nbytes), group=meta_group(pg))
            check_rendezvous_sizes([n for _, n in found])
            size = _pad_at(nbytes) + SIGNAL_PAD_BYTES
            maps = [whole if i == rank else _map(name, size) for i, (name, _) in enumerate(found)]
            dist.barrier(group=meta_group(pg))  # every rank has mapped every file before any is unlinked
        finally:
            os.unlink(path)  # the mappings outlive the name; nothing is left in /dev/shm
        pads = [m[_pad_at(nbytes) :].view(FLAG_DTYPE) for m in maps]
        return Handle(rank, [m[:nbytes] for m in maps], pads, nbytes)

    # --- stream-ordered work
    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        token = race.transfer_issued(dst)
        jitter = self.rng.uniform(0, self.copy_jitter_s) if self.copy_jitter_s else 0.0

        def run():
            try:
                race.poison(dst)
                time.sleep(jitter)
                dst.copy_(src)
            finally:
                race.transfer_done(token)

        self.current_stream().put(run)

    def stream_write_value32(self, flags: torch.Tensor, index: int, value: int) -> None:
        self.memset32(flags, index, value, 1)

    def memset32(self, flags: torch.Tensor, index: int, value: int, count: int) -> None:
        def write():
            try:
                for i in range(index, index + count):
                    race.check_signal(flags[i:].data_ptr(), value)
            finally:  # written anyway, as a GPU would: the readers go on, and the error is reported
                flags[index : index + count].fill_(value)

        self.current_stream().put(write)

    def sleep(self, seconds: float) -> None:
        self.current_stream().put(lambda: time.sleep(seconds))

    def launch(self, launch, guards=(), pushes=()) -> None:
        if launch.kernel is None:
            return
        checked = [race.Guard(*race.region(r), flags[i:].data_ptr(), value, i) for r, flags, i, value in guards]
        name = launch.kernel.fn.__name__
        armed = race.arm(checked)

        def run():
            try:
                for t in pushes:
                    race.poison(t)
                with race.watch(name, checked):
                    launch.run()
            finally:
                race.disarm(armed)

        self.current_stream().put(run)
