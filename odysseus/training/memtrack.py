"""Live tensor bytes on any device, op by op: the peak of a forward + backward + ``finalize_grads``.

:class:`MemoryTracker` is a ``TorchDispatchMode``: every aten op that runs while it is active reports its
outputs, and each output storage it has not seen is an allocation. A weak reference on the storage says
when it is freed (torch keeps one Python object per storage while the storage lives, so the reference
dies with the memory). Views, in-place ops and ``out=`` ops write into storages their inputs already hold:
only their growth counts. FSDP2 allocates and frees its gathered parameters by resizing storages
(``UntypedStorage.resize_``, not an op); the tracker wraps that method while it is active.

Bytes are counted relative to what exists when the tracker starts (parameters, inputs): ``peak_bytes`` is
the most that was alive at once on top of that. The inner ops of ``odysseus`` custom ops run with the
mode popped, so the tracker re-enters itself around them to see their transients (receive slots, the
gathered input). Not seen: memory a kernel allocates inside one op (cuBLAS workspaces, SDPA's scratch,
gloo's and NCCL's buffers) and storages made outside torch ops (``from_file``/shared memory).

torch.profiler's ``profile_memory`` misses large CPU allocations; this counts every storage.
"""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves, tree_map_only

from ..profiling import SavedActivations

REENTER = ("odysseus",)
"""Op namespaces whose implementations the tracker follows inside (their inner ops are otherwise hidden)."""


def _storages(t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    """The storages behind ``t``: its own, or its inner tensors' for a wrapper subclass (DTensor)."""
    if is_traceable_wrapper_subclass(t):
        for name in t.__tensor_flatten__()[0]:
            yield from _storages(getattr(t, name))
    elif t.device.type != "meta":
        yield t.untyped_storage()


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class MemoryTracker(TorchDispatchMode):
    """Counts the bytes of tensor storages alive while it is active, relative to its start.

    >>> with MemoryTracker() as mem:
    ...     y = block(x)
    ...     y.backward(dy)
    >>> mem.peak_bytes, mem.peak_op, mem.live_bytes

    ``phase(name)`` marks a span; ``phase_peaks[name]`` is the peak reached inside it. One tracker at a time.
    """

    _active: MemoryTracker | None = None

    def __init__(self, trace: bool = False) -> None:
        super().__init__()
        self.trace: list[tuple[str, int]] | None = [] if trace else None
        """With ``trace=True``: ``(phase:op, live_bytes)`` after every change, for finding what makes a peak."""
        self._depth = 0
        self.live_bytes = 0
        """Bytes alive now beyond the start (negative if something that existed at the start was freed)."""
        self.peak_bytes = 0
        """The most ``live_bytes`` has been."""
        self.peak_op = ""
        """The op (and phase) that reached ``peak_bytes``."""
        self.phase_peaks: dict[str, int] = {}
        self._phase = ""
        self._size: dict[int, int] = {}  # id(storage) -> its bytes now
        self._refs: dict[int, weakref.ref] = {}

    # --- bookkeeping ------------------------------------------------------------------------------

    def _grow(self, delta: int, what: str) -> None:
        self.live_bytes += delta
        if self.trace is not None:
            self.trace.append((f"{self._phase}:{what}", self.live_bytes))
        if self._phase:
            self.phase_peaks[self._phase] = max(self.phase_peaks.get(self._phase, 0), self.live_bytes)
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_op = self.live_bytes, f"{self._phase}:{what}" if self._phase else what

    def _freed(self, key: int, _ref: weakref.ref) -> None:
        if not self._depth:  # the tracker has stopped: its numbers stay as they were at the end
            return
        self.live_bytes -= self._size.pop(key, 0)
        self._refs.pop(key, None)
        if self.trace is not None:
            self.trace.append((f"{self._phase}:free", self.live_bytes))

    def _track(self, s: torch.UntypedStorage, size: int, delta: int, what: str) -> None:
        """``s`` now holds ``size`` bytes, ``delta`` more than the tracker counted for it so far."""
        key = id(s)
        if key not in self._refs:
            self._refs[key] = weakref.ref(s, lambda r, key=key: self._freed(key, r))
        self._size[key] = size
        if delta:
            self._grow(delta, what)

    def _resized(self, s: torch.UntypedStorage, before: int, what: str) -> None:
        after = s.nbytes()
        if after != before or id(s) in self._refs:
            self._track(s, after, after - before, what)

    # --- the mode ---------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {id(s): (s, s.nbytes()) for t in _tensors((args, kwargs)) for s in _storages(t)}
        out = self._call(func, args, kwargs)
        what = str(func.overloadpacket.__name__)
        for t in _tensors(out):
            for s in _storages(t):
                key = id(s)
                if key in inputs:  # a view, an in-place op or out=: only growth is new memory
                    self._resized(s, self._size.get(key, inputs[key][1]), what)
                elif key not in self._refs:
                    self._track(s, s.nbytes(), s.nbytes(), what)
        for s, before in inputs.values():  # an argument an op resized without returning it
            if s.nbytes() != self._size.get(id(s), before):
                self._resized(s, self._size.get(id(s), before), what)
        return out

    def _call(self, func, args, kwargs):
        if func.namespace not in REENTER:
            return func(*args, **kwargs)
        # Run the op's own kernel with this mode pushed again, so its inner ops are seen; redispatching
        # below the Python key keeps the op itself from coming back here.
        device = next((t.device for t in _tensors((args, kwargs))), torch.device("cpu"))
        key = getattr(torch._C.DispatchKey, device.type.upper(), None)
        if key is None:
            return func(*args, **kwargs)
        with self:
            return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute what runs inside to phase ``name`` (``phase_peaks[name]``; ``peak_op`` names it)."""
        outer, self._phase = self._phase, name
        self.phase_peaks[name] = max(self.phase_peaks.get(name, self.live_bytes), self.live_bytes)
        try:
            yield
        finally:
            self._phase = outer

    def __enter__(self) -> MemoryTracker:
        if MemoryTracker._active not in (None, self):
            raise RuntimeError("a MemoryTracker is already active; nest phases with tracker.phase(name) instead")
        if MemoryTracker._active is None:
            self._patch_resize()
            MemoryTracker._active, self._depth = self, 0
        self._depth += 1  # _call re-enters the mode around custom ops
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._depth -= 1
        if self._depth == 0:
            MemoryTracker._active = None
            del torch.UntypedStorage.resize_  # the base class's method shows through again
        return out

    def _patch_resize(self) -> None:
        # FSDP2 gathers into and frees its unsharded parameters by resizing their storages: not an op.
        original = torch._C.StorageBase.resize_
        tracker = self

        def resize_(storage, size):
            before = storage.nbytes()
            result = original(storage, size)
            tracker._resized(storage, tracker._size.get(id(storage), before), "UntypedStorage.resize_")
            return result

        torch.UntypedStorage.resize_ = resize_


class _Sink(torch.autograd.Function):
    """A scalar whose gradient with respect to ``y`` is ``dy``, keeping neither (``y`` can be freed)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        ctx.dy = dy  # made before the tracker started: not a new allocation
        return y.new_zeros(())

    @staticmethod
    def backward(ctx, _grad):
        return ctx.dy, None


_SETTLED = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor")
_SETTLED += ("all_reduce", "all_to_all_single")


@contextmanager
def settled_collectives(timeout_s: float = 5.0) -> Iterator[None]:
    """Make the synchronous ``torch.distributed`` collectives return only once the backend's worker thread
    has let go of their tensors.

    gloo runs a collective on a worker thread that holds its tensors until it has released the work,
    shortly after the caller's ``wait()`` returns. When the caller drops a buffer right after the collective
    (FSDP2 frees its all-gather buffer after the copy-out), the worker's reference can keep it alive for a
    few more ops, at a moment that depends on thread scheduling: measured peaks would vary from run to run.
    Inside this context each wrapped call waits (at most ``timeout_s``) until the storages of its tensors are
    back to the references they had before the call. Calls looked up through ``torch.distributed`` at call
    time are wrapped (FSDP2's), and those ``odysseus.comm.primitives`` calls.
    """
    from ..comm import primitives  # binds the tensor collectives of this torch release at import

    targets = [(dist, name) for name in _SETTLED if hasattr(dist, name)]
    targets += [(primitives, name) for name in ("all_gather_tensor", "reduce_scatter_tensor")]
    originals = {(mod, name): getattr(mod, name) for mod, name in targets}

    def wrap(fn):
        def settled(*args, **kwargs):
            if kwargs.get("async_op"):
                return fn(*args, **kwargs)
            storages = {id(s): s for t in _tensors((args, kwargs)) for s in _storages(t)}
            before = {k: torch._C._storage_Use_Count(s._cdata) for k, s in storages.items()}
            # The backend gets fresh views: whatever it keeps of them shows in the storages' use counts.
            args, kwargs = tree_map_only(torch.Tensor, lambda t: t.view(t.shape), (args, kwargs))
            out = fn(*args, **kwargs)
            del args, kwargs
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and any(
                torch._C._storage_Use_Count(s._cdata) > before[k] for k, s in storages.items()
            ):
                time.sleep(1e-4)
            return out

        return settled

    for (mod, name), fn in originals.items():
        setattr(mod, name, wrap(fn))
    try:
        yield
    finally:
        for (mod, name), fn in originals.items():
            setattr(mod, name, fn)


@dataclass
class StepMemory:
    """What one forward + backward (+ gradient sync) of a module held, in bytes beyond its start."""

    peak: int
    """Most bytes alive at once (forward, backward and the sync)."""
    saved: int
    """Bytes autograd kept for backward at the end of forward (:class:`~odysseus.profiling.SavedActivations`)."""
    forward_peak: int
    backward_peak: int
    """Peak inside ``backward()`` and the sync."""
    peak_op: str
    """The op that reached ``peak``, with its phase."""


def step_memory(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, sync: Callable | None = None) -> StepMemory:
    """Measure ``y = module(x); y.backward(dy); sync(module)`` (``sync``: e.g. ``odysseus.finalize_grads``).

    ``x`` and ``dy`` are made before the tracker starts, as in a model where the block's input comes from
    the block below and its output gradient from the block above.
    """
    # Python's cycle collector runs when allocation counts say so: a collection inside the step would free
    # whatever reference cycles hold at an arbitrary moment. Collect before, and not during.
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with settled_collectives(), MemoryTracker() as mem:
            with mem.phase("forward"), SavedActivations(module) as saved:
                loss = _Sink.apply(module(x), dy)  # the output is freed here, as when the next block consumed it
            with mem.phase("backward"):
                loss.backward()
                if sync is not None:
                    sync(module)
    finally:
        if enabled:
            gc.enable()
    phases = mem.phase_peaks
    return StepMemory(mem.peak_bytes, saved.peak_bytes, phases["forward"], phases["backward"], mem.peak_op)
