"""A race detector for the flag protocol, under the Triton interpreter.

A kernel that consumes data another agent delivers (a copy engine's pull, a peer's pushed partial) may load
that data only after it has acquired the data's flag for the current epoch, and only once the transfer has
finished. On a GPU a violation reads stale or half-written data now and then; here it is caught every time:

- :func:`transfer_issued` / :func:`transfer_done` bracket a transfer (called by the runtime that runs it):
  between the two its destination is *pending*; :func:`check_signal`, called before a flag write, refuses
  to publish a chunk of a queued launch (:func:`arm`) while a transfer into it is pending; :func:`poison`
  fills a destination with NaN before a transfer, so a read that slips through anyway shows up in the numbers.
- :func:`watch` runs a launch with its *guards*: ``(region, flag address, value, index)``. While it runs,
  every atomic a program makes on a guard's flag that returns the guard's value counts as that program's
  acquire; every load that touches a guard's region checks that no pending transfer overlaps the loaded
  addresses and that the loading program acquired the flag first. A violation raises :class:`RaceError`
  naming the kernel, the program, the chunk and the epoch. A program that gave up a wait (it claims the
  status record with a compare-and-swap, :func:`odykernels.signal.record_timeout`) is no longer checked:
  its output is garbage by contract, and the timeout is reported.

Hooks wrap the interpreter's load and atomic builders once per process; they do nothing outside :func:`watch`.
Kernels need no change: the detector sees the loads and atomics the interpreter executes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from triton.runtime import interpreter

_local = threading.local()
_pending: dict[int, tuple[int, int]] = {}
_armed: dict[int, list] = {}  # guards of the launches queued and not yet finished, by launch token
_lock = threading.Lock()
_tokens = itertools.count()
_hooked = False


class RaceError(RuntimeError):
    """A kernel loaded delivered data it had not acquired, or whose transfer had not finished."""


@dataclasses.dataclass(frozen=True)
class Guard:
    """Bytes ``[start, end)`` may be loaded once ``*flag == value``; ``index`` names the chunk."""

    start: int
    end: int
    flag: int
    value: int
    index: int


def region(t: torch.Tensor) -> tuple[int, int]:
    """The byte range ``[start, end)`` that ``t``'s elements span."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def transfer_issued(dst: torch.Tensor) -> int:
    """Mark ``dst`` pending (a transfer into it is queued); returns the token for :func:`transfer_done`."""
    with _lock:
        token = next(_tokens)
        _pending[token] = region(dst)
    return token


def transfer_done(token: int) -> None:
    """The transfer of ``token`` has finished: its destination may be read (by a program that acquired it)."""
    with _lock:
        _pending.pop(token, None)


def arm(guards: Sequence[Guard]) -> int:
    """Register the guards of a launch when it is queued, for :func:`check_signal`; returns a token for
    :func:`disarm` (called when the launch has run)."""
    with _lock:
        token = next(_tokens)
        _armed[token] = list(guards)
    return token


def disarm(token: int) -> None:
    """The launch of ``token`` has run: its guards no longer judge flag writes."""
    with _lock:
        _armed.pop(token, None)


def check_signal(flag: int, value: int) -> None:
    """Raise :class:`RaceError` if writing ``value`` at address ``flag`` would publish a chunk of a queued launch
    while a transfer into that chunk is still pending: a flag raised before its data, caught at the write,
    whatever the timing of the reader."""
    with _lock:
        for guards in _armed.values():
            for g in guards:
                if g.flag == flag and g.value == value and any(a < g.end and g.start < b for a, b in _pending.values()):
                    raise RaceError(
                        f"race: the flag of chunk {g.index} (epoch {value}) was written while a transfer into the "
                        "chunk was still running"
                    )


def poison(t: torch.Tensor) -> None:
    """Fill ``t`` with NaN (floating dtypes), so data read before its transfer lands is visibly wrong."""
    if t.is_floating_point():
        t.fill_(float("nan"))


@dataclasses.dataclass
class _Scope:
    kernel: str
    guards: Sequence[Guard]
    acquired: set = dataclasses.field(default_factory=set)
    gave_up: set = dataclasses.field(default_factory=set)

    def note_atomic(self, ptrs: np.ndarray, values: np.ndarray, program: tuple) -> None:
        addrs, vals = np.ravel(ptrs), np.ravel(values)
        for g in self.guards:
            hit = addrs == g.flag
            if hit.any() and np.any(vals[hit].astype(np.int64) & 0xFFFFFFFF == g.value):
                self.acquired.add((program, g.flag))

    def check_load(self, ptrs: np.ndarray, mask: np.ndarray, program: tuple) -> None:
        if program in self.gave_up:
            return
        addrs = np.ravel(ptrs)[np.ravel(np.broadcast_to(mask, np.shape(ptrs)))]
        if addrs.size == 0:
            return
        lo, hi = int(addrs.min()), int(addrs.max())
        for g in self.guards:
            if hi < g.start or lo >= g.end:
                continue
            inside = addrs[(addrs >= g.start) & (addrs < g.end)]
            if inside.size == 0:
                continue
            where = f"{self.kernel}: program {program[0]} loaded chunk {g.index} (epoch {g.value})"
            with _lock:
                late = [r for r in _pending.values() if _overlaps(inside, r)]
            if late:
                raise RaceError(f"race: {where} while its transfer was still running")
            if (program, g.flag) not in self.acquired:
                raise RaceError(f"race: {where} before acquiring its flag for that epoch")


def _overlaps(addrs: np.ndarray, span: tuple[int, int]) -> bool:
    return bool(np.any((addrs >= span[0]) & (addrs < span[1])))


def _install() -> None:
    global _hooked
    if _hooked:
        return
    builder = interpreter.InterpreterBuilder
    load, rmw, cas = builder.create_masked_load, builder.create_atomic_rmw, builder.create_atomic_cas

    def create_masked_load(self, ptrs, mask, *args):
        scope = getattr(_local, "scope", None)
        if scope is not None:
            scope.check_load(ptrs.data, mask.data, self.grid_idx)
        return load(self, ptrs, mask, *args)

    def create_atomic_rmw(self, op, ptr, *args):
        out = rmw(self, op, ptr, *args)
        scope = getattr(_local, "scope", None)
        if scope is not None:
            scope.note_atomic(ptr.data, out.data, self.grid_idx)
        return out

    def create_atomic_cas(self, ptr, *args):
        # The kernels' only compare-and-swap claims the status record for a wait that gave up
        # (odykernels.signal.record_timeout): that program's output is garbage by contract, and reported.
        scope = getattr(_local, "scope", None)
        if scope is not None:
            scope.gave_up.add(self.grid_idx)
        return cas(self, ptr, *args)

    builder.create_masked_load = create_masked_load
    builder.create_atomic_rmw = create_atomic_rmw
    builder.create_atomic_cas = create_atomic_cas
    _hooked = True


@contextlib.contextmanager
def watch(kernel: str, guards: Sequence[Guard]) -> Iterator[None]:
    """Check the interpreted launches this thread runs inside the block against ``guards``."""
    _install()
    _local.scope = _Scope(kernel, list(guards))
    try:
        yield
    finally:
        _local.scope = None
