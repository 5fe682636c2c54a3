"""What the overlap ops (``odysseus.overlap``) hold beyond their inputs and outputs, per backend: the gathers'
receive slots or whole gathered copies, the reduce-scatters' partial sums, the fp32 weight-gradient
accumulators of the streamed backward, and symm's persistent workspaces. ``odysseus.plan.memory`` adds them to
the block's moments; ``perf/memory.py`` checks the sums against ``odysseus.training.memtrack.MemoryTracker``.
"""

from __future__ import annotations

from ..layout import shard_sizes
from .case import Case

FP32 = 4


def ring_slot_bytes(case: Case, width: int) -> int:
    """The receive slots of one streamed gather of a ``width``-wide input (``save_input="shard"``):
    ``min(slots, pieces) x tokens x B x width``, whatever the sequence length."""
    sizes, rank, tokens = shard_sizes(case.seq, case.world), case.rank, case.piece_tokens()
    pieces = sum(-(-n // tokens) for j, n in enumerate(sizes) if j != rank)
    return max(1, min(case.ring_slots, pieces)) * tokens * case.batch * width * case.dtype_bytes


def gather_held_bytes(case: Case, width: int, backend: str) -> tuple[int, int]:
    """(while consumed, at the call) bytes of one gather of a ``width``-wide sequence-split input in
    ``"shard"`` mode. pipelined and symm stream it through the ring's slots (pipelined also makes a
    sequence-major copy of this rank's shard when ``B > 1``); naive gathers it whole in one collective,
    padded to the largest shard, trimmed where the shards are uneven (the padded copies live during the call)."""
    B, e, sizes = case.batch, case.dtype_bytes, shard_sizes(case.seq, case.world)
    row = B * width * e
    if backend != "naive":
        held = ring_slot_bytes(case, width) + (case.shape.tokens * row if B > 1 and backend == "pipelined" else 0)
        return held, held
    m, mine = max(sizes), sizes[case.rank]
    own = m if mine != m else (mine if B > 1 else 0)  # this rank's rows padded, or made contiguous
    call = (case.world * m + (case.seq if len(set(sizes)) > 1 else 0) + own) * row
    return case.seq * row, call


def symm_workspace_bytes(case: Case) -> int:
    """The symm backend's persistent symmetric workspaces for one process group (allocated once, shared by
    every block and op of the group, grown to a power of two): the all-gather stage holds this rank's
    largest chunk ``(L_r, B, d)``; the reduce-scatter receive buffer holds one slot per source rank
    ``N x L_r x B x d``, rows and columns padded to 16 bytes. From ``odysseus.overlap.symm.reserve``."""
    B, d, e, m = case.batch, case.config.hidden_size, case.dtype_bytes, max(shard_sizes(case.seq, case.world))
    step = 16 // e
    rows, cols = -(-m * B // step) * step, -(-d // step) * step

    def grown(numel: int) -> int:
        return 1 << max(numel - 1, 1).bit_length()

    return (grown(m * B * d) + grown(case.world * rows * cols)) * e


def input_gemm_backward(case: Case, backend: str, width: int) -> int:
    """Transient of an all-gather⊗GEMM's backward with ``save_input="shard"`` for a ``width``-column weight:
    the re-gathered input held while the weight gradient accumulates in fp32 (each piece's product in 16
    bits and in fp32, and the running fp32 sum; naive gathers one piece, so there is no running sum), or the
    gather call's own copies."""
    d, e = case.config.hidden_size, case.dtype_bytes
    w = d * width
    held, call = gather_held_bytes(case, d, backend)
    return max(call, held + (e + (1 if backend == "naive" else 2) * FP32) * w)


def output_gemm_backward(case: Case, backend: str, width: int) -> int:
    """Transient of a GEMM⊗reduce-scatter's backward for a ``width``-row weight: the input gradient
    ``(B, L, width)`` beside the output gradient gathered, streamed with ``save_input="shard"`` (the weight
    gradient accumulated as in :func:`input_gemm_backward`), whole with ``"gathered"`` (an all-gather⊗GEMM
    that returns it, then one product for the weight gradient)."""
    dx = case.batch * case.seq * width * case.dtype_bytes
    if case.save_input == "shard":
        return dx + input_gemm_backward(case, backend, width)
    d = case.config.hidden_size
    held, call = gather_held_bytes(case, d, backend)
    if backend != "naive":  # the gathered gradient is received in place, into its own (B, L, d) buffer
        held = call = case.batch * case.seq * d * case.dtype_bytes
    return max(call, held + dx + case.dtype_bytes * d * width)


def output_gemm_forward(case: Case, backend: str) -> int:
    """Transient of a GEMM⊗reduce-scatter's forward (``(B, L, d)`` partial sums reduced to ``(B, L_r, d)``):
    naive makes the partials whole, a zero-padded copy where the shards are uneven, and the output;
    pipelined without a ring receives one slot per source, keeps its sent partials until they are sent
    and sums the slots in fp32. The ring (``save_input="shard"``) holds three chunks of partials, symm
    sums in its persistent workspace: neither is a peak."""
    B, d, e = case.batch, case.config.hidden_size, case.dtype_bytes
    sizes, row = shard_sizes(case.seq, case.world), B * d * e
    m, mine = max(sizes), sizes[case.rank]
    if backend == "naive":
        return (case.seq + (case.world * m if len(set(sizes)) > 1 else 0) + m) * row
    if backend == "pipelined" and case.save_input != "shard":
        return (case.world * mine + case.seq) * row + mine * B * d * FP32
    return 0
