"""The exact closed forms of one block on one rank: the collectives it issues with their bytes, and the
bytes of its weights. ``tests/test_volume.py`` checks the collectives against the CommLedger record for
record; ``perf/comm_volume.py`` checks them and FSDP2's against a real run, and ``perf/memory.py`` the
weight forms against the parameters' storage (activation memory and the peak: :mod:`odysseus.plan.memory`).

Notation: ``L_j`` tokens on rank j (``shard_sequence`` rule), ``L = sum L_j``, batch ``B``, width ``d``,
``H``/``KV`` query/kv heads of width ``hd``, FFN width ``i``, world ``N``, ``e`` bytes per element; rank r
holds query heads ``h_r`` and kv heads ``kv_r`` (uneven when N does not divide them). Bytes received by
rank r (even shapes in brackets, with ``D = B*L*d*e``):

- all-reduce (TP): 2 per part (attention, FFN), each counted as reduce-scatter + all-gather [``8 (N-1)/N * D``].
- all-gather + reduce-scatter (TP-SP; Odysseus' attention): 2 of each per part, ``B*(L-L_r)*d`` and
  ``(N-1)*B*L_r*d`` [``4 (N-1)/N * D`` per part]; with ``save_input="shard"`` one more all-gather per part in
  backward (the input of its first GEMM, re-gathered for the weight gradient) [``5 (N-1)/N * D``].
- all-to-all (Ulysses): q and the output move ``(N-1)/N`` of this rank's tokens times ``h_r*hd``, k and v
  ``kv_r*hd`` [``(4 + 4*KV/H) (N-1)/N**2 * D``].
- gradient sync: one all-reduce of the weights every rank holds whole, the norms where the sequence is
  split, and the k/v rows of a kv head that several ranks hold (GQA).

Which applies comes from the strategy's :class:`~odysseus.strategies.registry.StrategySpec`.
"""

from __future__ import annotations

from typing import NamedTuple

from ..config import TransformerConfig
from ..layout import (
    HeadSplit,
    all_reduce_bytes,
    dense_shapes,
    gather_bytes,
    ring_chunks,
    scatter_bytes,
    shard_sizes,
)
from ..strategies.registry import ALL_REDUCE, ALL_TO_ALL, ATTENTION_WEIGHTS, FFN_WEIGHTS, GATHER_SCATTER, NO_TRAFFIC
from .case import Case

Record = tuple[str, str, str, int]
"""(phase, op, category, bytes_received) of one collective."""

_GEMMS = {"attention": ("attn.qkv", "attn.out"), "ffn": ("ffn.up", "ffn.down")}
"""The labels of each part's input-side and output-side GEMM: its collectives sit before and after them."""


class Collective(NamedTuple):
    """One collective as rank r sees it, in the terms of a :class:`odysseus.comm.ledger.CommRecord`."""

    phase: str
    op: str
    category: str
    label: str
    bytes_sent: int
    bytes_received: int


def dense_numel(config: TransformerConfig) -> dict[str, int]:
    """Elements of every linear weight of the dense block, by Hugging Face name."""
    return {n: a * b for n, (a, b) in dense_shapes(config).items()}


def _all_reduce(case: Case, phase: str, category: str, label: str, numel: int) -> Collective:
    b = all_reduce_bytes(numel, case.world, case.rank, case.dtype_bytes)
    return Collective(phase, "all_reduce", category, label, b, b)


def _part_collectives(case: Case, kind: str, part: str) -> list[Collective]:
    """The activation collectives of one part (``attention`` or ``ffn``) moved as ``kind`` (a spec field)."""
    B, d, e, N, r = case.batch, case.config.hidden_size, case.dtype_bytes, case.world, case.rank
    first, last = _GEMMS[part]
    if kind == ALL_REDUCE:
        # copy_to_tp is an identity forward whose gradient is all-reduced; reduce_from_tp the reverse.
        numel = B * case.seq * d
        return [
            _all_reduce(case, phase, "activation", label, numel)
            for phase, label in (("forward", last), ("backward", first))
        ]
    if kind == GATHER_SCATTER:
        sizes = shard_sizes(case.seq, N)
        ag = ("all_gather", *gather_bytes(sizes, r, B * d * e))
        rs = ("reduce_scatter", *scatter_bytes(sizes, r, B * d * e))
        # all-gather before the first GEMM, reduce-scatter after the last; backward runs the duals. Keeping
        # only the shard (save_input="shard") re-gathers the first GEMM's input for its weight gradient.
        order = (("forward", first, ag), ("backward", first, rs), ("forward", last, rs), ("backward", last, ag))
        if case.save_input == "shard":
            order += (("backward", first, ag),)
        return [Collective(phase, op, "activation", label, sent, got) for phase, label, (op, sent, got) in order]
    if kind == ALL_TO_ALL:
        return _all_to_all_collectives(case)
    if kind == NO_TRAFFIC:
        return []
    raise ValueError(f"{case.spec.name}: unknown comm kind {kind!r} for the {part}")


def _all_to_all_collectives(case: Case) -> list[Collective]:
    """Sequence <-> heads all-to-alls of q, k, v and the output, forward and backward."""
    c, B, e, N, r = case.config, case.batch, case.dtype_bytes, case.world, case.rank
    heads = HeadSplit.build(c, N, r)
    q = [b - a for a, b in heads.q]
    kv = [b - a for a, b in heads.kv]
    mine, others = case.shape.tokens, case.seq - case.shape.tokens

    def to_heads(phase: str, label: str, n: list[int]) -> Collective:
        # this rank's tokens of the other ranks' heads out; the other ranks' tokens of its heads in
        sent, received = B * mine * (sum(n) - n[r]) * c.head_dim * e, B * others * n[r] * c.head_dim * e
        return Collective(phase, "all_to_all", "activation", label, sent, received)

    def to_seq(phase: str, label: str, n: list[int]) -> Collective:
        t = to_heads(phase, label, n)
        return t._replace(bytes_sent=t.bytes_received, bytes_received=t.bytes_sent)

    out = [to_heads("forward", "attn.q", q), to_heads("forward", "attn.k", kv), to_heads("forward", "attn.v", kv)]
    out += [to_seq("forward", "attn.o", q), to_heads("backward", "attn.o", q), to_seq("backward", "attn.q", q)]
    return out + [to_seq("backward", "attn.k", kv), to_seq("backward", "attn.v", kv)]


def heads_split(case: Case) -> bool:
    """The attention weights are split by heads (not held whole), so the QKV and output GEMMs of this rank's
    heads see the full sequence and a kv head may be held by several ranks."""
    return not set(ATTENTION_WEIGHTS) & set(case.spec.replicated)


def ffn_split(case: Case) -> bool:
    """The FFN weights are split by columns (not held whole): the FFN GEMMs see the full sequence."""
    return not set(FFN_WEIGHTS) & set(case.spec.replicated)


def _summed_numel(case: Case) -> int:
    """Elements ``finalize_grads`` all-reduces: the whole weights, the norms where each rank's norms see only
    its tokens, and the k/v rows of a kv head several ranks hold. Under ZeRO-3, FSDP2 reduce-scatters the
    whole weights and norms instead (:func:`zero3_records`), leaving the shared k/v rows."""
    c, dense = case.config, dense_numel(case.config)
    shared = heads_split(case) and HeadSplit.build(c, case.world, case.rank).shared_kv
    numel = dense["k_proj"] + dense["v_proj"] if shared else 0
    if not case.variant.zero3:
        numel += sum(dense[n] for n in case.spec.replicated)
        numel += 2 * c.hidden_size if case.spec.sequence_split else 0
    return numel


def expected_collectives(case: Case) -> list[Collective]:
    """The collectives (excluding length metadata) the library issues on ``case.rank`` for one block's
    forward, backward and ``finalize_grads``, with their labels and the bytes sent and received, in no
    particular order. For a ZeRO-3 variant, FSDP2's own collectives are :func:`zero3_records`.

    Sent bytes are the duals of received ones: an all-gather sends this rank's ``L_r`` rows to ``N-1``
    peers and a reduce-scatter sends the other ranks' ``L - L_r`` rows; an all-to-all sends what it would
    receive with the roles swapped; an all-reduce sends what it receives.
    """
    if case.world == 1:
        return []
    out = _part_collectives(case, case.spec.attention_comm, "attention")
    out += _part_collectives(case, case.spec.ffn_comm, "ffn")
    # Forward all-reduces before backward ones: the order the time model has always added them in (floats).
    out.sort(key=lambda x: x.op == "all_reduce" and x.phase == "backward")
    numel = _summed_numel(case)
    return out + ([_all_reduce(case, "backward", "gradient", "grads", numel)] if numel else [])


def expected_records(case: Case) -> list[Record]:
    """:func:`expected_collectives` as (phase, op, category, bytes_received), the form the planner uses."""
    return [(x.phase, x.op, x.category, x.bytes_received) for x in expected_collectives(case)]


def bytes_per_rank(case: Case) -> dict[str, int]:
    """Bytes ``case.rank`` receives per block (forward+backward), split into ``activation`` and ``gradient``."""
    out = {"activation": 0, "gradient": 0}
    for _, _, category, b in expected_records(case):
        out[category] += b
    return out


def ring_tokens_per_rank(seq: int, ring: int) -> list[int]:
    """Tokens of every ring rank (its two chunks, :func:`odysseus.layout.ring_chunks`) for a sequence of ``seq``."""
    return [sum(e - s for s, e in chunks) for chunks in ring_chunks(seq, ring)]


def ring_collectives(
    config: TransformerConfig,
    batch: int,
    seq: int,
    ring: int,
    sp: int,
    ring_rank: int,
    sp_rank: int,
    dtype_bytes: int,
) -> list[Collective]:
    """The point-to-point hops of one attention's ring (:mod:`odysseus.comm.ring`) on ring rank i, sp rank s of a
    (ring, sp) mesh, mesh dim ``ring``, in the order issued.

    A block of ring rank j moves ``B * T_j * kv_s * hd * 2 * e`` bytes (K and V, the ``kv_s`` kv heads sp rank s
    holds, unexpanded; ``T_j`` ring rank j's tokens). At step t rank i sends the block of ring rank ``(i-t) mod R``
    and receives that of ``(i-t-1) mod R``. Forward: R-1 K/V hops. Backward: R-1 K/V hops and R hops of the
    dK/dV buffers (same sizes), each after the K/V hop of its step. The sp part of the strategy runs on the ring
    rank's ``T_i`` tokens: its records are :func:`expected_collectives` of a :class:`Case` with ``seq=T_i``.
    """
    if ring == 1:
        return []
    tokens = ring_tokens_per_rank(seq, ring)
    kv_start, kv_end = HeadSplit.build(config, sp, sp_rank).kv[sp_rank]
    unit = batch * (kv_end - kv_start) * config.head_dim * 2 * dtype_bytes

    def hop(phase: str, what: str, t: int) -> Collective:
        src = (ring_rank - t) % ring
        return Collective(phase, "send_recv", "activation", f"attn.ring.{what}", unit * tokens[src],
                          unit * tokens[(src - 1) % ring])  # fmt: skip

    out = [hop("forward", "kv", t) for t in range(ring - 1)]
    for t in range(ring):
        out += ([hop("backward", "kv", t)] if t < ring - 1 else []) + [hop("backward", "dkv", t)]
    return out


# --- ZeRO-3 (FSDP2) -----------------------------------------------------------------------------------


def _fsdp_units(case: Case) -> list[list[tuple[int, int]]]:
    """The modules ``odysseus.zero3`` shards (each one whose weights are all held whole, and the norms
    where they are summed), as the dense ``(dim0, rest)`` of their parameters: FFN, norms, attention."""
    shapes, whole, d = dense_shapes(case.config), set(case.spec.replicated), case.config.hidden_size
    ffn = [shapes[n] for n in FFN_WEIGHTS] if set(FFN_WEIGHTS) <= whole else []
    attention = [shapes[n] for n in ATTENTION_WEIGHTS] if set(ATTENTION_WEIGHTS) <= whole else []
    norms = [[(d, 1)], [(d, 1)]] if case.spec.sequence_split else []
    return [u for u in (ffn, *norms, attention) if u]


def _fsdp_local(dim0: int, rest: int, world: int, rank: int) -> tuple[int, int]:
    """(padded, unpadded) numel of ``rank``'s FSDP2 shard: dim 0 in chunks of ceil(dim0/N), zero-padded."""
    chunk = -(-dim0 // world)
    return chunk * rest, max(0, min(chunk, dim0 - rank * chunk)) * rest


def zero3_records(case: Case, reshard: bool = True) -> list[Record]:
    """FSDP2's collectives for one block of ``odysseus.zero3``, as (phase, op, category, bytes received).

    Per sharded module: one all-gather of its padded shards in forward, another in backward when
    ``reshard`` (parameters freed after forward), and one reduce-scatter of the gradients. Each rank
    receives the other ranks' padded shards: ``(N-1) * sum ceil(dim0/N) * rest`` elements per op.
    ``odysseus.zero3`` reshards after forward by default; ``reshard=False`` models
    ``zero3(par, reshard_after_forward=False)``. Batch and sequence do not matter.
    """
    N, r = case.world, case.rank
    if N == 1:
        return []
    out: list[Record] = []
    for unit in _fsdp_units(case):
        b = (N - 1) * sum(_fsdp_local(dim0, rest, N, r)[0] for dim0, rest in unit) * case.dtype_bytes
        out.append(("forward", "all_gather", "weight", b))
        if reshard:
            out.append(("backward", "all_gather", "weight", b))
        out.append(("backward", "reduce_scatter", "gradient", b))
    return out


def strategy_records(case: Case, reshard: bool = True) -> list[Record]:
    """Every collective of one block's forward+backward+gradient sync on ``case.rank``: the library's
    (:func:`expected_records`) and, for a ZeRO-3 variant, FSDP2's (:func:`zero3_records`)."""
    return expected_records(case) + (zero3_records(case, reshard) if case.variant.zero3 else [])


# --- weights (activation memory: odysseus.plan.memory) -----------------------------------------------


def weight_numel(case: Case) -> dict[str, tuple[int, int]]:
    """(parameter, gradient) elements on ``case.rank`` of the ``attention``, ``ffn`` and ``norms`` weights of one
    block. A part FSDP2 shards (ZeRO-3) keeps each parameter in a zero-padded buffer of ceil(dim0/N) rows, so
    its parameter count includes the padding; its gradient is the unpadded shard."""
    c, s, dense = case.config, case.shape, dense_numel(case.config)
    d, hd = c.hidden_size, c.head_dim
    attn = (2 * s.q_heads + 2 * s.kv_heads) * hd * d if heads_split(case) else sum(dense[n] for n in ATTENTION_WEIGHTS)
    ffn = 3 * s.ffn_cols * d if ffn_split(case) else sum(dense[n] for n in FFN_WEIGHTS)
    out = {"attention": (attn, attn), "ffn": (ffn, ffn), "norms": (2 * d, 2 * d)}
    if not case.variant.zero3:
        return out
    whole = set(case.spec.replicated)
    sharded = {"ffn": set(FFN_WEIGHTS) <= whole, "attention": set(ATTENTION_WEIGHTS) <= whole}
    sharded["norms"] = case.spec.sequence_split
    for part, unit in zip(("ffn", "norms", "attention"), _fsdp_units_by_part(case)):
        if sharded[part]:
            shards = [_fsdp_local(dim0, rest, case.world, case.rank) for dim0, rest in unit]
            out[part] = (sum(p for p, _ in shards), sum(u for _, u in shards))
    return out


def _fsdp_units_by_part(case: Case) -> list[list[tuple[int, int]]]:
    """The dense ``(dim0, rest)`` of the FFN's, the two norms' and the attention's parameters, in that order."""
    shapes, d = dense_shapes(case.config), case.config.hidden_size
    return [[shapes[n] for n in FFN_WEIGHTS], [(d, 1), (d, 1)], [shapes[n] for n in ATTENTION_WEIGHTS]]


def parameter_bytes(case: Case) -> dict[str, int]:
    """One block's ``params``, ``grads`` and ``adamw`` (2 states in the parameter dtype) bytes on ``case.rank``.

    ZeRO-3 variants: FSDP2 keeps each sharded parameter in a zero-padded buffer of ceil(dim0/N) rows, so
    ``params`` counts the padding; gradients and optimizer states are the unpadded shard
    (:func:`weight_numel`). Batch and sequence do not matter.
    """
    e, parts = case.dtype_bytes, weight_numel(case).values()
    params, grads = sum(p for p, _ in parts), sum(g for _, g in parts)
    return {"params": params * e, "grads": grads * e, "adamw": 2 * grads * e}


def fsdp_gathered_numel(case: Case) -> int:
    """Elements of the weights of one block that FSDP2 gathers whole under ZeRO-3."""
    return sum(a * b for unit in _fsdp_units(case) for a, b in unit)
