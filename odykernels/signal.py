"""Flags between ranks: a bounded wait that reports a timeout, a release notify, and the host-side check.

A flag is a uint32 word (the dtype CUDA's stream memory operations write, see
``_SymmetricMemory.stream_write_value32``). A producer sets it to the current *epoch* (a call counter,
>= 1) once the data it guards is in place; a consumer waits until it reads exactly that epoch. Flags
therefore never need a reset between calls: the next call simply waits for the next epoch. Flags start
at 0 (never written).

Every wait is bounded. Compiled for a GPU, the bound is a deadline on the GPU's global timer
(nanoseconds); under the CPU interpreter, which has no timer, it is a number of polls (the interpreter
polls about 6,000 times a second on the 2-core CI VM, triton 3.7.1). Launchers take one ``timeout_s``
and turn it into either with :func:`wait_budget`.

A wait that runs out records the first failure in a *status* tensor, int32 ``[STATUS_WORDS]`` on the
kernel's device, zero while all is well::

    status[0]  1 + index of the flag waited on (the chunk for ag_matmul, the source rank for reduce_slots)
    status[1]  the last value read from that flag (its 32 bits, as int32)
    status[2]  the value expected (the epoch)
    status[3]  the output tile of the program that gave up

The first failing program claims the record with a compare-and-swap on ``status[0]``, so the words always
describe one wait. After a failure, later waits in any program (and in later launches sharing the record)
give up at once instead of each spending a full budget, so a dead peer costs about one budget, not one per
tile. Reading the record is a host synchronisation; :func:`read_status` is the only place that does it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

STATUS_WORDS = 4
FLAG_DTYPE = torch.uint32
DEFAULT_TIMEOUT_S = 30.0
"""Default bound on one wait. Long enough for a peer that is a step behind, short enough to beat a hang."""
INTERPRETER_POLLS_PER_S = 5000
"""Polls per second assumed under the interpreter to turn a timeout into a poll budget (measured: ~5,900)."""
MAX_TIMEOUT_S = 2_000.0
"""Budgets travel as int32 microseconds: about 35 minutes at most."""


@triton.jit
def global_time_ns():
    """The GPU's global timer, nanoseconds (``%globaltimer``, as ``triton.language.extra.cuda.globaltimer``).

    Written with ``tl.inline_asm_elementwise`` itself so that under the interpreter the call reaches the
    builder, where :mod:`odykernels._interpret` answers it with the host's clock.
    """
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def wait_flag(flag_ptr, expected, budget, status_ptr, index, tile, USE_CLOCK: tl.constexpr):
    """Spin (acquire, system scope) until ``*flag_ptr == expected``, within ``budget``.

    ``budget`` is microseconds of GPU global time when ``USE_CLOCK`` (under the interpreter the host clock
    stands in for the timer), else a number of reads. Returns whether the flag was seen; on a timeout fills the status
    record (see module docstring) with ``index`` (which flag) and ``tile`` (which output tile waited).
    Loads issued after this call observe everything the producer wrote before its release, for the whole
    program (the barrier at the end).
    """
    want = expected.to(tl.uint32)
    seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    if seen != want:
        # A failure anywhere already dooms this launch; do not spend another budget per tile on it.
        earlier = tl.atomic_add(status_ptr, 0, sem="relaxed", scope="gpu")
        limit = tl.where(earlier == 0, budget, 0).to(tl.int64)
        if USE_CLOCK:
            start = global_time_ns()
            limit = limit * 1000  # microseconds -> the timer's nanoseconds
            while (seen != want) & (global_time_ns() - start < limit):
                seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
        else:
            polls = tl.full([], 1, tl.int64)
            while (seen != want) & (polls < limit):
                seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
                polls += 1
        if seen != want:
            record_timeout(status_ptr, seen, expected, index, tile)
    # The acquire above is issued by one thread; the barrier extends its ordering to the whole program.
    tl.debug_barrier()
    return seen == want


@triton.jit
def record_timeout(status_ptr, seen, expected, index, tile):
    """Fill the status record for a wait on flag ``index`` that gave up, unless an earlier failure holds it.

    The words are written with atomic exchanges, not stores: the kernels' only ``st.global`` instructions
    are then their data stores, which the compile checks require to be 128-bit.
    """
    if tl.atomic_cas(status_ptr, 0, index + 1, sem="relaxed", scope="gpu") == 0:
        tl.atomic_xchg(status_ptr + 1, seen.to(tl.int32, bitcast=True), sem="relaxed", scope="gpu")
        tl.atomic_xchg(status_ptr + 2, expected, sem="relaxed", scope="gpu")
        tl.atomic_xchg(status_ptr + 3, tile, sem="relaxed", scope="gpu")


@triton.jit
def _spin_acquire_fenced(flag_ptr, want, limit_ns):
    """GPU only. Every thread polls ``*flag_ptr`` (acquire, system scope) until it reads ``want`` or ``limit_ns``
    of global time pass; then one ``bar.red.and`` both joins the threads and tells them all whether every
    thread saw the flag, and ``fence.proxy.async.global`` orders what they acquired before the async proxy's
    (TMA) reads that follow. Returns (the last value this thread read, 1 if all threads saw ``want`` else 0).

    Inline PTX for the barrier because Triton 3.6/3.7 do not software-pipeline a loop whose body holds a
    ``tl.debug_barrier`` (``gpu.barrier``; compiled for sm_90: one stage and 48 KiB of shared memory instead
    of three) but do pipeline one holding inline asm (a Triton ``while`` loop alone does not stop them);
    and for the fence, which neither version offers as a builtin. The poll loop shares the block. Labels
    are local to the ``{ }`` block, so the helper may be inlined more than once.
    """
    return tl.inline_asm_elementwise(
        """
        {
        .reg .pred %p<3>;
        .reg .u64 %t<3>;
        mov.u64 %t0, %globaltimer;
        $$ODY_SPIN:
        ld.global.acquire.sys.u32 $0, [$2];
        setp.eq.u32 %p0, $0, $3;
        @%p0 bra $$ODY_DONE;
        mov.u64 %t1, %globaltimer;
        sub.u64 %t2, %t1, %t0;
        setp.lt.u64 %p1, %t2, $4;
        @%p1 bra $$ODY_SPIN;
        $$ODY_DONE:
        bar.red.and.pred %p2, 0, %p0;
        selp.u32 $1, 1, 0, %p2;
        fence.proxy.async.global;
        }
        """,
        "=r,=r,l,r,l",
        [flag_ptr, want, limit_ns],
        dtype=(tl.uint32, tl.uint32),
        is_pure=False,
        pack=1,
    )


@triton.jit
def wait_flag_for_tma(flag_ptr, expected, budget, status_ptr, index, tile, USE_CLOCK: tl.constexpr):
    """:func:`wait_flag` for data that tensor-descriptor (TMA) loads read next, usable inside a pipelined loop.

    Compiled for a GPU (``USE_CLOCK``) the wait is :func:`_spin_acquire_fenced`: every thread acquires the
    flag itself, the threads join, and a ``fence.proxy.async.global`` orders the acquired data before the
    TMA engine's reads (the flag is acquired in the generic proxy; TMA reads through the async proxy). Under
    the interpreter (no proxies, no PTX) it is :func:`wait_flag`. Same budget and status record as
    :func:`wait_flag`; returns whether the flag was seen.
    """
    if USE_CLOCK:
        want = expected.to(tl.uint32)
        earlier = tl.atomic_add(status_ptr, 0, sem="relaxed", scope="gpu")
        limit = tl.where(earlier == 0, budget, 0).to(tl.int64) * 1000  # microseconds -> nanoseconds
        seen, ok = _spin_acquire_fenced(flag_ptr, want, limit)
        if ok == 0:
            record_timeout(status_ptr, seen, expected, index, tile)
        return ok != 0
    else:
        return wait_flag(flag_ptr, expected, budget, status_ptr, index, tile, False)


@triton.jit
def cta_barrier(USE_ASM: tl.constexpr):
    """Join all threads of the program. ``USE_ASM`` (compiled for a GPU): a ``bar.sync 0`` in inline PTX,
    which Triton's software pipeliner accepts inside a loop (a ``tl.debug_barrier`` there makes it give up
    pipelining, triton 3.6/3.7); otherwise ``tl.debug_barrier`` (the interpreter cannot run PTX)."""
    if USE_ASM:
        tl.inline_asm_elementwise("bar.sync 0; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.debug_barrier()


@triton.jit
def notify(flag_ptr, value, USE_ASM: tl.constexpr = False):
    """Set ``*flag_ptr = value`` with release semantics at system scope, after all of this program's stores.

    The barrier first makes every thread's stores (e.g. a tile written to a peer) part of what the
    single-thread release publishes (``USE_ASM``, default off: see :func:`cta_barrier`; compiled kernels
    that notify inside a software-pipelined loop need it).
    """
    cta_barrier(USE_ASM)
    tl.atomic_xchg(flag_ptr, value.to(tl.uint32), sem="release", scope="sys")


def wait_budget(timeout_s: float, interpreted: bool, what: str) -> int:
    """The ``budget`` argument of :func:`wait_flag` for ``timeout_s``: microseconds, or polls when interpreted."""
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ValueError(f"{what}: timeout_s={timeout_s} must be in (0, {MAX_TIMEOUT_S}]")
    if interpreted:
        return max(1, math.ceil(timeout_s * INTERPRETER_POLLS_PER_S))
    return max(1, math.ceil(timeout_s * 1e6))


def new_status(device: torch.device | str) -> torch.Tensor:
    """A cleared status record, int32 ``[STATUS_WORDS]``; one may be shared by many launches."""
    return torch.zeros(STATUS_WORDS, dtype=torch.int32, device=device)


def check_vector(t: torch.Tensor, dtype: torch.dtype, length: int, device: torch.device, what: str, name: str) -> None:
    """Raise ``ValueError`` unless ``t`` is a 1-D ``dtype`` tensor of ``length`` elements on ``device``."""
    if t.dtype != dtype or tuple(t.shape) != (length,) or t.device != device:
        raise ValueError(
            f"{what}: {name} must be {str(dtype).removeprefix('torch.')} [{length}] on {device}, "
            f"got {t.dtype} {list(t.shape)} on {t.device}"
        )


def check_status_tensor(status: torch.Tensor | None, device: torch.device, what: str) -> None:
    """Raise ``ValueError`` unless ``status`` is an int32 ``[STATUS_WORDS]`` tensor on ``device`` (not None:
    the launch records its timeouts there)."""
    if status is None:
        raise ValueError(f"{what}: a status tensor is required to record timeouts in")
    check_vector(status, torch.int32, STATUS_WORDS, device, what, "status")


def check_flags_tensor(flags: torch.Tensor, world: int, device: torch.device, what: str, name: str = "flags") -> None:
    """Raise ``ValueError`` unless ``flags`` is a contiguous uint32 ``[world]`` tensor on ``device``."""
    check_vector(flags, FLAG_DTYPE, world, device, what, name)
    if not flags.is_contiguous():
        raise ValueError(f"{what}: {name} must be contiguous, got strides {flags.stride()}")


def check_epoch(epoch: int, what: str, name: str = "epoch") -> None:
    """Raise ``ValueError`` unless ``1 <= epoch < 2**31`` (0 is the never-written flag value)."""
    if not 1 <= epoch < 2**31:
        raise ValueError(f"{what}: {name}={epoch} must be in [1, 2**31) (0 is the never-written flag value)")


def check_waits(
    flags: torch.Tensor,
    world: int,
    epoch: int,
    timeout_s: float,
    status: torch.Tensor | None,
    device: torch.device,
    interpreted: bool,
    what: str,
    epoch_name: str = "epoch",
) -> int:
    """Check the arguments of a kernel that waits on ``flags`` for ``epoch`` and records timeouts in ``status``
    (:func:`check_flags_tensor`, :func:`check_epoch`, :func:`wait_budget`, :func:`check_status_tensor`, in
    that order); returns the kernel's ``budget``."""
    check_flags_tensor(flags, world, device, what)
    check_epoch(epoch, what, epoch_name)
    budget = wait_budget(timeout_s, interpreted, what)
    check_status_tensor(status, device, what)
    return budget


def read_status(status: torch.Tensor) -> list[int]:
    """The four words of a status record. The one host read of a record: it waits for the device."""
    return [int(v) for v in status.tolist()]


def check_status(status: torch.Tensor, rank: int, what: str, index_name: str = "chunk") -> None:
    """Raise ``TimeoutError`` if a wait recorded in ``status`` timed out; synchronizes with the device.

    Args:
        status: int32 ``[STATUS_WORDS]`` record filled by the kernels' waits.
        rank: the rank whose kernel waited (named in the message).
        what: the operation, e.g. ``"ag_matmul"``.
        index_name: what the flag index means: ``"chunk"`` (ag_matmul) or ``"source"`` (reduce_slots).
    """
    code, seen, expected, tile = read_status(status)
    if code != 0:
        raise TimeoutError(
            f"{what}: rank {rank} timed out waiting for {index_name} {code - 1}: its flag read "
            f"{seen & 0xFFFFFFFF}, expected {expected} (output tile {tile}); the producer of that {index_name} "
            f"never signalled this epoch, or the timeout is too short"
        )
