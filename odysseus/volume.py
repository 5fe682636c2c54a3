"""Closed-form communication of one block's forward+backward, per rank: the collectives each strategy
must issue, with the bytes each rank sends and receives. ``tests/test_volume.py`` checks these against the
CommLedger record for record, on even and uneven shapes.

Notation: ``L_j`` tokens on rank j (``shard_sequence`` rule), ``L = sum L_j``, batch ``B``, width ``d``,
``H``/``KV`` query/kv heads of width ``hd``, FFN width ``i``, world ``N``, ``e`` bytes per element; rank r
holds query heads ``h_r`` and kv heads ``kv_r`` (uneven when N does not divide them).

Bytes received by rank r (even shapes in brackets, with ``D = B*L*d*e``):

- TP: 4 all-reduces of ``B*L*d`` (2 forward, 2 backward), each counted as reduce-scatter + all-gather
  [``4 * 2(N-1)/N * D``].
- TP-SP: 4 all-gathers of ``B*(L-L_r)*d`` and 4 reduce-scatters of ``(N-1)*B*L_r*d`` [``8 (N-1)/N * D``].
- Odysseus: half of TP-SP's activations (the FFN moves none) [``4 (N-1)/N * D``], plus one all-reduce of
  the replicated FFN and norm gradients, ``3*d*i + 2*d`` elements, independent of L.
- Ulysses: 8 all-to-alls; q and the attention output move ``(N-1)/N`` of this rank's tokens times
  ``h_r*hd``, k and v ``kv_r*hd`` [``(4 + 4*KV/H) (N-1)/N**2 * D``], plus one all-reduce of every gradient.
- With GQA, a kv head whose query heads sit on several ranks is held by each of them (TP, TP-SP,
  Odysseus); those k/v gradients are summed with one all-reduce of the dense ``2*KV*hd*d`` k/v weights.

So "Odysseus moves half of TP-SP" holds for activations at any N, but Ulysses' all-to-all is
``O(L*d/N)`` per rank: it moves less than Odysseus once N > 2 for multi-head attention.
"""

from __future__ import annotations

from typing import NamedTuple

from .comm.sizes import head_ranges, kv_range, shard_sizes
from .config import TransformerConfig

Record = tuple[str, str, str, int]
"""(phase, op, category, bytes_received) of one collective."""


class Collective(NamedTuple):
    """One collective as rank r sees it, in the terms of a :class:`odysseus.comm.ledger.CommRecord`."""

    phase: str
    op: str
    category: str
    label: str
    bytes_sent: int
    bytes_received: int


def _all_reduce_bytes(numel: int, world: int, rank: int, e: int) -> int:
    c = shard_sizes(numel, world)[rank]
    return ((numel - c) + (world - 1) * c) * e


def _shared_kv(config: TransformerConfig, world: int) -> bool:
    kv = [kv_range(q, config.q_per_kv) for q in head_ranges(config.num_heads, world)]
    return any(kv[j][1] > kv[j + 1][0] for j in range(world - 1))


def expected_collectives(
    strategy: str, config: TransformerConfig, batch: int, seq_len: int, world: int, rank: int = 0, dtype_bytes: int = 2
) -> list[Collective]:
    """The collectives (excluding length metadata) rank ``rank`` issues for one block's forward,
    backward and ``finalize_grads``, with their labels and the bytes sent and received, in no particular
    order.

    Sent bytes are the duals of received ones: an all-gather sends this rank's ``L_r`` rows to ``N-1``
    peers and a reduce-scatter sends the other ranks' ``L - L_r`` rows; an all-to-all sends what it would
    receive with the roles swapped; an all-reduce sends what it receives.
    """
    if world == 1:
        return []
    c, e, B, N, r = config, dtype_bytes, batch, world, rank
    d, hd, i = c.hidden_size, c.head_dim, c.intermediate_size
    L = shard_sizes(seq_len, N)
    kv_weights = 2 * c.num_kv_heads * hd * d
    out: list[Collective] = []

    def all_reduce(phase: str, category: str, label: str, numel: int) -> Collective:
        b = _all_reduce_bytes(numel, N, r, e)
        return Collective(phase, "all_reduce", category, label, b, b)

    if strategy == "tp":
        # copy_to_tp is an identity forward whose gradient is all-reduced; reduce_from_tp the reverse.
        for ph, label in (
            ("forward", "attn.out"),
            ("forward", "ffn.down"),
            ("backward", "attn.qkv"),
            ("backward", "ffn.up"),
        ):
            out.append(all_reduce(ph, "activation", label, B * seq_len * d))
        if _shared_kv(c, N):
            out.append(all_reduce("backward", "gradient", "grads", kv_weights))
        return out
    if strategy in ("tp-sp", "odysseus"):
        mine, others = B * L[r] * d * e, B * (seq_len - L[r]) * d * e
        ag = ("all_gather", "activation", (N - 1) * mine, others)
        rs = ("reduce_scatter", "activation", others, (N - 1) * mine)
        # all-gather (input side) and reduce-scatter (output side) per op; backward runs the duals.
        ops = [("attn.qkv", ag, rs), ("attn.out", rs, ag)]
        if strategy == "tp-sp":
            ops += [("ffn.up", ag, rs), ("ffn.down", rs, ag)]
        for label, fwd, bwd in ops:
            out.append(Collective("forward", fwd[0], fwd[1], label, fwd[2], fwd[3]))
            out.append(Collective("backward", bwd[0], bwd[1], label, bwd[2], bwd[3]))
        grads = 2 * d + (3 * d * i if strategy == "odysseus" else 0) + (kv_weights if _shared_kv(c, N) else 0)
        out.append(all_reduce("backward", "gradient", "grads", grads))
        return out
    if strategy == "ulysses":
        q = [b - a for a, b in head_ranges(c.num_heads, N)]
        kv = [b - a for a, b in (kv_range(x, c.q_per_kv) for x in head_ranges(c.num_heads, N))]
        others = seq_len - L[r]

        def to_heads(phase: str, label: str, heads: list[int]) -> Collective:
            # this rank's tokens of the other ranks' heads out; the other ranks' tokens of its heads in
            sent, received = B * L[r] * (sum(heads) - heads[r]) * hd * e, B * others * heads[r] * hd * e
            return Collective(phase, "all_to_all", "activation", label, sent, received)

        def to_seq(phase: str, label: str, heads: list[int]) -> Collective:
            t = to_heads(phase, label, heads)
            return t._replace(bytes_sent=t.bytes_received, bytes_received=t.bytes_sent)

        out += [to_heads("forward", "attn.q", q), to_heads("forward", "attn.k", kv), to_heads("forward", "attn.v", kv)]
        out += [to_seq("forward", "attn.o", q), to_heads("backward", "attn.o", q), to_seq("backward", "attn.q", q)]
        out += [to_seq("backward", "attn.k", kv), to_seq("backward", "attn.v", kv)]
        params = 2 * c.num_heads * hd * d + kv_weights + 3 * d * i + 2 * d
        out.append(all_reduce("backward", "gradient", "grads", params))
        return out
    raise ValueError(f"unknown strategy {strategy!r}")


def expected_records(
    strategy: str, config: TransformerConfig, batch: int, seq_len: int, world: int, rank: int = 0, dtype_bytes: int = 2
) -> list[Record]:
    """:func:`expected_collectives` as (phase, op, category, bytes_received), the form the planner uses."""
    return [
        (x.phase, x.op, x.category, x.bytes_received)
        for x in expected_collectives(strategy, config, batch, seq_len, world, rank, dtype_bytes)
    ]


def bytes_per_rank(
    strategy: str, config: TransformerConfig, batch: int, seq_len: int, world: int, rank: int = 0, dtype_bytes: int = 2
) -> dict[str, int]:
    """Bytes rank ``rank`` receives per block (forward+backward), split into ``activation`` and ``gradient``."""
    out = {"activation": 0, "gradient": 0}
    for _, _, category, b in expected_records(strategy, config, batch, seq_len, world, rank, dtype_bytes):
        out[category] += b
    return out
