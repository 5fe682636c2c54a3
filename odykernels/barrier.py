"""A barrier over a group's signal pads with the kernels' own bounded waits: a timeout is recorded, never a trap.

torch's symmetric-memory ``barrier(channel, timeout_ms)`` traps the device when it times out (a dead or slow
peer kills the process, docs/SYMM_CONTRACT.md §5). This one is a one-program kernel on the library's own words:
every rank writes the barrier's epoch into each peer's pad (release, system scope: what the stream did before
is visible first), then waits for each peer's word with :func:`odykernels.signal.wait_flag`, the same bounded
wait the GEMMs use. A wait that gives up fills a status record (see :mod:`odykernels.signal`; the tile word
holds ``-1 - channel``, so a record shared with GEMM waits tells a barrier's failure from theirs), which the
host reads when it checks; later waits sharing the record give up at once: the stream drains, and the host
raises ``TimeoutError``.

Pad layout, uint32 words, identical on every rank: channel ``c`` owns ``2 * world`` words; epoch ``e`` uses
the half ``e % 2``, word ``src`` of it is written by rank ``src``. A rank can be at most one barrier ahead of
a peer on a channel (it cannot pass barrier ``e + 1`` before the peer arrives there), so alternating halves
keep a fast rank's next signal from overwriting the word a slow peer still waits on, and every wait is for an
exact value. Epochs must therefore alternate in parity from one barrier to the next on a channel, through
their wrap too (:func:`next_epoch`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from odykernels._runtime import Launch, is_interpreted
from odykernels.signal import (
    FLAG_DTYPE,
    check_epoch,
    check_status_tensor,
    check_vector,
    notify,
    read_status,
    wait_budget,
    wait_flag,
)

LAST_EPOCH = 2**31 - 2
"""Barrier epochs run 1 .. LAST_EPOCH and wrap to 1: LAST_EPOCH is even, so parity alternates across the wrap."""


@triton.jit(do_not_specialize=["rank", "world", "base", "tag", "epoch", "budget"])
def _barrier_kernel(
    pad_ptr, pad_offsets_ptr, status_ptr, rank, world, base, tag, epoch, budget, USE_CLOCK: tl.constexpr
):
    for step in range(1, world):
        peer = (rank + step) % world
        notify(pad_ptr + tl.load(pad_offsets_ptr + peer) + base + rank, epoch)
    for step in range(1, world):
        peer = (rank + step) % world
        wait_flag(pad_ptr + base + peer, epoch, budget, status_ptr, peer, tag, USE_CLOCK)


def next_epoch(epoch: int) -> int:
    """The epoch of the barrier after one at ``epoch`` (0: none yet) on the same channel."""
    return epoch % LAST_EPOCH + 1


def channels(pad: torch.Tensor, world: int) -> int:
    """How many barrier channels a pad of ``pad.numel()`` words holds for ``world`` ranks."""
    return pad.numel() // (2 * world)


def prepare_barrier(
    pad: torch.Tensor,
    pad_offsets: torch.Tensor,
    rank: int,
    channel: int,
    epoch: int,
    *,
    timeout_s: float,
    status: torch.Tensor,
) -> Launch:
    """The launch of one barrier: ``.compile()`` ahead, ``.run()`` in stream order; ``.check()`` raises on timeout.

    Args:
        pad: this rank's uint32 signal pad, flat and contiguous; every rank's has the same size.
        pad_offsets: int64 ``(world,)``: element offsets of every rank's pad from this one's.
        rank: this rank.
        channel: in ``[0, channels(pad, world))``; barriers on different channels are independent.
        epoch: this barrier's epoch on the channel, in ``[1, 2**31)``; consecutive barriers on a channel
            alternate parity (:func:`next_epoch`).
        timeout_s: bound on the wait for each peer.
        status: int32 ``[STATUS_WORDS]`` record, zero while all is well (:func:`check_barrier_status`).
    """
    what = "barrier"
    world = pad_offsets.shape[0] if pad_offsets.dim() == 1 else -1
    if pad.dtype != FLAG_DTYPE or pad.dim() != 1 or not pad.is_contiguous():
        raise ValueError(f"{what}: pad must be a flat contiguous uint32 tensor, got {pad.dtype} {list(pad.shape)}")
    check_vector(pad_offsets, torch.int64, world, pad.device, what, "pad_offsets")
    if not 0 <= rank < world:
        raise ValueError(f"{what}: rank={rank} must be in [0, {world})")
    if not 0 <= channel < channels(pad, world):
        raise ValueError(f"{what}: channel={channel} must be in [0, {channels(pad, world)}) for {world} ranks")
    check_epoch(epoch, what)
    check_status_tensor(status, pad.device, what)
    interpreted = is_interpreted(_barrier_kernel, pad.device)
    budget = wait_budget(timeout_s, interpreted, what)
    base = channel * 2 * world + (epoch % 2) * world
    args = (pad, pad_offsets, status, rank, world, base, -1 - channel, epoch, budget)
    kwargs = dict(USE_CLOCK=not interpreted, num_warps=1)
    return Launch(_barrier_kernel, pad.device, (1,), args, kwargs, None, lambda: check_barrier_status(status, rank))


def timeout_message(words: list[int], rank: int, what: str) -> str | None:
    """The error for a status record's ``words`` (:func:`odykernels.signal.read_status`) if a barrier gave up
    there, else None."""
    code, seen, expected, tag = words
    if code == 0 or tag >= 0:
        return None
    peer = code - 1
    return (
        f"{what}: rank {rank} timed out on channel {-1 - tag} waiting for rank {peer} to arrive: its signal read "
        f"{seen & 0xFFFFFFFF}, expected {expected} (rank {peer} is dead, hung, or far behind)"
    )


def check_barrier_status(status: torch.Tensor, rank: int, what: str = "barrier") -> None:
    """Raise ``TimeoutError`` naming the channel and the peer if a barrier recorded in ``status`` gave up."""
    message = timeout_message(read_status(status), rank, what)
    if message is not None:
        raise TimeoutError(message)
