"""Flags between ranks: a bounded wait that reports a timeout, a release notify, and the host-side check.

A flag is an int32 word. A producer sets it to the current *epoch* (a call counter, >= 1) once the data it
guards is in place; a consumer waits until it reads exactly that epoch. Flags therefore never need a
reset between calls: the next call simply waits for the next epoch. Flags start at 0 (never written).

Every wait is bounded by a poll budget. A wait that runs out records the first failure in a *status*
tensor, int32 ``[STATUS_WORDS]`` on the kernel's device, zero while all is well::

    status[0]  1 + index of the flag waited on (the chunk for ag_matmul, the source rank for reduce_slots)
    status[1]  the last value read from that flag
    status[2]  the value expected (the epoch)
    status[3]  the output tile of the program that gave up

The first failing program claims the record with a compare-and-swap on ``status[0]``, so the words always
describe one wait. After a failure, later waits in any program give up at once instead of each spending a
full budget, so a dead peer costs about one budget per launch, not one per tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

STATUS_WORDS = 4


@triton.jit
def wait_flag(flag_ptr, expected, max_polls, status_ptr, index, tile):
    """Spin (acquire, system scope) until ``*flag_ptr == expected``, at most ``max_polls`` reads.

    Returns whether the flag was seen; on a timeout fills the status record (see module docstring) with
    ``index`` (which flag) and ``tile`` (which output tile waited). Loads issued after this call observe
    everything the producer wrote before its release, for the whole program (the barrier at the end).
    """
    seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    if seen != expected:
        # A failure anywhere already dooms this launch; do not spend another budget per tile on it.
        earlier = tl.atomic_add(status_ptr, 0, sem="relaxed", scope="gpu")
        budget = tl.where(earlier == 0, max_polls, 0)
        polls = 1
        while (seen != expected) & (polls < budget):
            seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
            polls += 1
        if seen != expected:
            if tl.atomic_cas(status_ptr, 0, index + 1, sem="relaxed", scope="gpu") == 0:
                tl.store(status_ptr + 1, seen)
                tl.store(status_ptr + 2, expected)
                tl.store(status_ptr + 3, tile)
    # The acquire above is issued by one thread; the barrier extends its ordering to the whole program.
    tl.debug_barrier()
    return seen == expected


@triton.jit
def notify(flag_ptr, value):
    """Set ``*flag_ptr = value`` with release semantics at system scope, after all of this program's stores.

    The barrier first makes every thread's stores (e.g. a tile written to a peer) part of what the
    single-thread release publishes.
    """
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, value, sem="release", scope="sys")


def new_status(device: torch.device | str) -> torch.Tensor:
    """A cleared status record, int32 ``[STATUS_WORDS]``; one may be shared by many launches."""
    return torch.zeros(STATUS_WORDS, dtype=torch.int32, device=device)


def check_status_tensor(status: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` unless ``status`` is an int32 ``[STATUS_WORDS]`` tensor."""
    if status.dtype != torch.int32 or tuple(status.shape) != (STATUS_WORDS,):
        raise ValueError(f"{what}: status must be int32 [{STATUS_WORDS}], got {status.dtype} {list(status.shape)}")


def check_status(status: torch.Tensor, rank: int, what: str, index_name: str = "chunk") -> None:
    """Raise ``TimeoutError`` if a wait recorded in ``status`` timed out; synchronizes with the device.

    Args:
        status: int32 ``[STATUS_WORDS]`` record filled by the kernels' waits.
        rank: the rank whose kernel waited (named in the message).
        what: the operation, e.g. ``"ag_matmul"``.
        index_name: what the flag index means: ``"chunk"`` (ag_matmul) or ``"source"`` (reduce_slots).
    """
    code, seen, expected, tile = (int(v) for v in status.tolist())
    if code != 0:
        raise TimeoutError(
            f"{what}: rank {rank} timed out waiting for {index_name} {code - 1}: its flag read {seen}, "
            f"expected {expected} (output tile {tile}); the producer of that {index_name} never signalled "
            f"this epoch, or the poll budget is too small"
        )
