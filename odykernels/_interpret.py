"""What Triton's interpreter leaves out of a GPU, put back for the CPU tests: programs in any order, a
thread switch at every atomic, and the global timer.

* **Program order.** A GPU runs a launch's programs in no fixed order, and at once; the interpreter runs
  them one after another in index order, so a protocol that only works when program 0 goes first would
  pass there. Here the i-th program the interpreter runs gets the index at position i of a seeded random
  permutation of the grid. Each launch draws its permutation from one generator, so a process's runs are
  reproducible. The seed comes from ``ODYSSEUS_PROGRAM_ORDER_SEED`` (an integer, default 0; ``index``
  keeps index order); tests set it with :func:`odykernels.testing.program_order`.
* **Thread switches.** Every atomic first yields the GIL (when other threads exist). The kernels' flag
  reads and writes are all atomics (``wait_flag`` polls with an acquire ``atomic_add`` of 0, ``notify``
  is an exchange, the tile counter an add), so host threads standing in for copy engines, streams and
  peers get to run between any two flag operations of a program, not only when the interpreter's switch
  interval says so.
* **The global timer.** ``%globaltimer`` is read with inline PTX, which the interpreter cannot run; the
  host's monotonic clock (nanoseconds, like the GPU's timer) stands in for it, and the TMA path's timed
  spin (inline PTX too) runs as a host loop on that clock, so both ``USE_CLOCK`` waits run on the CPU.
  Any other inline assembly still raises.

:func:`install` patches the interpreter's one builder object, once per process; ``_runtime`` calls it
before every interpreted launch.
"""

from __future__ import annotations

import os
import random
import threading
import time

import numpy as np
import triton.language as tl
from triton.runtime import interpreter

ORDER_SEED_ENV = "ODYSSEUS_PROGRAM_ORDER_SEED"
GLOBALTIMER_ASM = "mov.u64 $0, %globaltimer;"
"""The PTX of ``odykernels.signal.global_time_ns`` (and of ``triton.language.extra.cuda.globaltimer``)."""
SPIN_LABEL = "$$ODY_SPIN:"
"""The loop label of ``odykernels.signal._spin_acquire_fenced``, the TMA path's timed wait, run by :func:`_spin`."""

_lock = threading.Lock()
_installed = False
_rng: random.Random | None = None
"""Draws each launch's program order; None: index order."""
_atomics = [0]


def atomic_count() -> int:
    """How many atomics interpreted kernels have run in this process: a test's host thread can wait for a
    kernel to reach its first flag (every flag access is an atomic) before it starts writing the data."""
    return _atomics[0]


def _env_seed() -> int | None:
    value = os.environ.get(ORDER_SEED_ENV, "0")
    if value == "index":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{ORDER_SEED_ENV}={value!r}: expected an integer seed or 'index'") from None


def set_program_order(seed: int | None) -> None:
    """Run the programs of later interpreted launches in orders drawn from ``seed`` (None: index order)."""
    global _rng
    _rng = None if seed is None else random.Random(seed)


def program_order_seed_from_env() -> None:
    """Reset the program order to what ``ODYSSEUS_PROGRAM_ORDER_SEED`` says (the process's default)."""
    set_program_order(_env_seed())


program_order_seed_from_env()


class _Results:
    """What ``tl.inline_asm_elementwise`` reads its outputs from (``get_result(i)``)."""

    def __init__(self, *handles):
        self.handles = handles

    def get_result(self, index: int):
        return self.handles[index]


def _yield() -> None:
    """Before an atomic: count it, and let other host threads run first (``time.sleep(0)`` releases the GIL).
    Only when there are other threads: the sleep is a system call, which on a loaded machine gives up the
    core and about doubled the cost of a poll (measured: 5,000 polls in 3.0 s instead of 1.5 s at load 12)."""
    _atomics[0] += 1
    if threading.active_count() > 1:
        time.sleep(0)


def _host_ns() -> interpreter.TensorHandle:
    return interpreter.TensorHandle(np.array([time.monotonic_ns()], dtype=np.int64), tl.int64)


def _spin(builder, flag_ptr, want, limit_ns) -> _Results:
    """``signal._spin_acquire_fenced`` on the host: poll ``*flag_ptr`` until it reads ``want`` or ``limit_ns`` of
    host time pass; (the last value read, 1 if it was ``want``). One program is one thread here, so the
    threads' join is trivial, and the CPU has no async proxy to fence."""
    start = time.monotonic_ns()
    while True:
        _yield()  # as at every atomic: let the writers run
        seen = builder.create_load(flag_ptr, None, None, False)
        if seen.data[0] == want.data[0] or time.monotonic_ns() - start >= limit_ns.data[0]:
            break
    ok = np.array([seen.data[0] == want.data[0]], dtype=np.uint32)
    return _Results(seen, interpreter.TensorHandle(ok, tl.uint32))


def install() -> None:
    """Patch the interpreter's builder (once): shuffled program indices, a yield per atomic, the host timer."""
    global _installed
    with _lock:
        if _installed:
            return
        builder = interpreter.interpreter_builder
        set_grid_dim, set_grid_idx = builder.set_grid_dim, builder.set_grid_idx
        inline_asm = builder.create_inline_asm
        # The atomics are looked up on the class at each call, not captured here: odykernels.race wraps them
        # there (possibly after this install), and the yield must not bypass its check.
        cls = type(builder)
        order: list[list[int] | None] = [None]

        def shuffled_grid_dim(nx, ny, nz):
            set_grid_dim(nx, ny, nz)
            n = nx * ny * nz
            order[0] = None if _rng is None else _rng.sample(range(n), n)

        def shuffled_grid_idx(x, y, z):
            # The interpreter walks x, y, z in index order; program number i of the walk becomes order[i].
            if order[0] is not None:
                _, ny, nz = builder.grid_dim
                x, rest = divmod(order[0][(x * ny + y) * nz + z], ny * nz)
                y, z = divmod(rest, nz)
            set_grid_idx(x, y, z)

        def yielding_rmw(*args):
            _yield()
            return cls.create_atomic_rmw(builder, *args)

        def yielding_cas(*args):
            _yield()
            return cls.create_atomic_cas(builder, *args)

        def host_timer_asm(asm, constraints, values, ty, is_pure, pack):
            if asm.strip() == GLOBALTIMER_ASM:
                return _Results(_host_ns())
            if SPIN_LABEL in asm:
                return _spin(builder, *values)
            return inline_asm(asm, constraints, values, ty, is_pure, pack)

        builder.set_grid_dim = shuffled_grid_dim
        builder.set_grid_idx = shuffled_grid_idx
        builder.create_atomic_rmw = yielding_rmw
        builder.create_atomic_cas = yielding_cas
        builder.create_inline_asm = host_timer_asm
        _installed = True
