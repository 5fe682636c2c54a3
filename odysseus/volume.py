"""Closed-form communication of one block's forward+backward, per rank: the collectives each strategy
must issue, with the bytes each rank receives. ``tests/test_volume.py`` checks these against the
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

from .comm.sizes import head_ranges, kv_range, shard_sizes
from .config import TransformerConfig

Record = tuple[str, str, str, int]
"""(phase, op, category, bytes_received) of one collective."""


def _all_reduce_bytes(numel: int, world: int, rank: int, e: int) -> int:
    c = shard_sizes(numel, world)[rank]
    return ((numel - c) + (world - 1) * c) * e


def _shared_kv(config: TransformerConfig, world: int) -> bool:
    kv = [kv_range(q, config.q_per_kv) for q in head_ranges(config.num_heads, world)]
    return any(kv[j][1] > kv[j + 1][0] for j in range(world - 1))


def expected_records(
    strategy: str, config: TransformerConfig, batch: int, seq_len: int, world: int, rank: int = 0, dtype_bytes: int = 2
) -> list[Record]:
    """The collectives (excluding length metadata) rank ``rank`` issues for one block's forward,
    backward and ``finalize_grads``, in no particular order."""
    if world == 1:
        return []
    c, e, B, N, r = config, dtype_bytes, batch, world, rank
    d, hd, i = c.hidden_size, c.head_dim, c.intermediate_size
    L = shard_sizes(seq_len, N)
    kv_weights = 2 * c.num_kv_heads * hd * d
    out: list[Record] = []
    if strategy == "tp":
        ar = _all_reduce_bytes(B * seq_len * d, N, r, e)
        out += [(ph, "all_reduce", "activation", ar) for ph in ("forward", "forward", "backward", "backward")]
        if _shared_kv(c, N):
            out.append(("backward", "all_reduce", "gradient", _all_reduce_bytes(kv_weights, N, r, e)))
        return out
    if strategy in ("tp-sp", "odysseus"):
        ag = B * (seq_len - L[r]) * d * e
        rs = (N - 1) * B * L[r] * d * e
        reps = 2 if strategy == "tp-sp" else 1
        for ph in ("forward", "backward"):
            out += [(ph, "all_gather", "activation", ag)] * reps + [(ph, "reduce_scatter", "activation", rs)] * reps
        grads = 2 * d + (3 * d * i if strategy == "odysseus" else 0) + (kv_weights if _shared_kv(c, N) else 0)
        out.append(("backward", "all_reduce", "gradient", _all_reduce_bytes(grads, N, r, e)))
        return out
    if strategy == "ulysses":
        q = head_ranges(c.num_heads, N)
        kv = [kv_range(x, c.q_per_kv) for x in q]
        h = [b - a for a, b in q]
        k = [b - a for a, b in kv]
        others = seq_len - L[r]
        to_heads_q, to_heads_kv = B * others * h[r] * hd * e, B * others * k[r] * hd * e
        to_seq_q = B * L[r] * (c.num_heads - h[r]) * hd * e
        to_seq_kv = B * L[r] * (sum(k) - k[r]) * hd * e
        out += [("forward", "all_to_all", "activation", b) for b in (to_heads_q, to_heads_kv, to_heads_kv, to_seq_q)]
        out += [("backward", "all_to_all", "activation", b) for b in (to_heads_q, to_seq_q, to_seq_kv, to_seq_kv)]
        params = 2 * c.num_heads * hd * d + kv_weights + 3 * d * i + 2 * d
        out.append(("backward", "all_reduce", "gradient", _all_reduce_bytes(params, N, r, e)))
        return out
    raise ValueError(f"unknown strategy {strategy!r}")


def bytes_per_rank(
    strategy: str, config: TransformerConfig, batch: int, seq_len: int, world: int, rank: int = 0, dtype_bytes: int = 2
) -> dict[str, int]:
    """Bytes rank ``rank`` receives per block (forward+backward), split into ``activation`` and ``gradient``."""
    out = {"activation": 0, "gradient": 0}
    for _, _, category, b in expected_records(strategy, config, batch, seq_len, world, rank, dtype_bytes):
        out[category] += b
    return out
