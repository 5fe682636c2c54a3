"""The ring dim of a ``("dp", "ring", "sp")`` mesh: ring attention's bytes, time and memory on one rank.

The protocol the modules implement: the sequence is cut into ``2R`` chunks; ring rank ``i`` holds chunks ``i`` and
``2R-1-i`` (causal load balance), ``L/R`` tokens, split over the ``S`` ranks of ``sp`` (innermost: inside a node).
The head-parallel part of each strategy runs over ``sp`` on those ``L/R`` tokens exactly as without a ring
(:mod:`.forms` with ``L -> L/R``, ``N -> S``: a :class:`~odysseus.plan.case.Case` with ``seq = L/R``,
``world = S``, ``ring = R``). Attention over the sequence is a ring over ``ring``: at step ``s`` a rank attends its
queries to the K/V block of ring rank ``i - s`` while the next block travels point to point; blocks merge by
log-sum-exp. Per rank per layer:

- forward: ``R-1`` K/V hops; backward: ``R-1`` K/V hops and ``R`` dK/dV hops (the accumulators pass on with
  their block and come home), each :func:`hop_bytes` ``= B * (L/R) * kv_local * hd * 2 * e`` (kv heads
  unexpanded: the ones this ``sp`` rank holds, ``layout.kv_range``);
- compute: step ``s`` does the query-key pairs of :func:`step_pairs`; with the head/tail layout every step has
  the same ``(L/R)^2 / 2`` pairs (step 0 as two causal diagonal blocks and one full block, the others as full
  blocks), so the slowest rank of a step is no slower than the mean (:func:`load_balance_factor` 1; a
  contiguous layout would be ``(2R-1)/R``);
- each hop hides behind the attention of the step it travels during (``Assumptions.ring_overlap``); the last
  dK/dV hop home has nothing left to hide behind.

The ring's ranks are ``S`` apart: the ring crosses nodes once ``R*S`` exceeds a node (then a hop runs at the NIC's
bandwidth and sets every step), while ``sp`` stays inside one.

Weights: every ring rank holds the same weights for other tokens, so ``finalize_grads`` sums their gradients over
the ring (:func:`ring_grad_records`); ZeRO-3 shards the whole weights FSDP2 takes over ``ring x sp``
(:func:`zero3_view`, :func:`ring_weight_numel`), leaving the head-split weights to the ring's sum.
"""

from __future__ import annotations

import dataclasses

from ..layout import all_reduce_bytes, shard_sizes
from ..strategies.registry import ATTENTION_WEIGHTS, FFN_WEIGHTS
from .case import Case
from .data_parallel import dp_grad_numel, dp_step_records
from .efficiency import attention_efficiency
from .forms import Record, _fsdp_local, _fsdp_units_by_part, weight_numel
from .presets import Assumptions, Hardware

FP32 = 4
TILE = 512
"""``odysseus.ops.ring_attention.TILE``: the query rows and key columns of one tile of scores (the planner imports
no torch code; tests/test_plan_ring.py checks the two agree)."""


def chunk_sizes(seq: int, ring: int) -> list[int]:
    """The ``2 * ring`` chunks of a ``seq``-token sequence (``shard_sizes`` rule)."""
    return shard_sizes(seq, 2 * ring)


def held_chunks(ring: int, i: int, balanced: bool = True) -> tuple[int, int]:
    """The chunks ring rank ``i`` holds: head ``i`` and tail ``2R-1-i``, or (``balanced=False``) ``2i, 2i+1``."""
    return (i, 2 * ring - 1 - i) if balanced else (2 * i, 2 * i + 1)


def _pairs(chunks: list[int], a: int, b: int, causal: bool) -> float:
    """Query-key pairs of query chunk ``a`` against key chunk ``b``: a causal diagonal block counts half."""
    if not causal or a > b:
        return float(chunks[a] * chunks[b])
    return chunks[a] ** 2 / 2 if a == b else 0.0


def step_pairs(chunks: list[int], ring: int, causal: bool = True, balanced: bool = True) -> list[list[float]]:
    """``pairs[s][i]``: query-key pairs ring rank ``i`` computes at step ``s``, against the K/V of ring rank
    ``(i - s) mod R`` (R = 1: the whole causal block, ``L^2 / 2`` as :func:`~odysseus.plan.cost.attention_flops`)."""
    out = []
    for s in range(ring):
        row = []
        for i in range(ring):
            mine, theirs = held_chunks(ring, i, balanced), held_chunks(ring, (i - s) % ring, balanced)
            row.append(sum(_pairs(chunks, a, b, causal) for a in mine for b in theirs))
        out.append(row)
    return out


def load_balance_factor(chunks: list[int], ring: int, causal: bool = True, balanced: bool = True) -> float:
    """The ring's attention time over the perfectly balanced one: every step waits for its slowest rank, so
    ``sum_s max_i pairs / (sum pairs / R)``."""
    pairs = step_pairs(chunks, ring, causal, balanced)
    total = sum(map(sum, pairs))
    return sum(max(row) for row in pairs) / (total / ring) if total else 1.0


def ring_refusal(spec, ring: int) -> str | None:
    """Why ``spec`` cannot run on a ring of ``ring`` ranks (None where it can): a ring cuts the sequence, and
    ``tp`` holds the whole sequence on every rank (the modules refuse a ring mesh for it too)."""
    if ring > 1 and not spec.sequence_split:
        return f"{spec.name} holds the whole sequence on every rank: a ring of {ring} needs a sequence-split strategy"
    return None


def hop_bytes(case: Case) -> int:
    """Bytes of one ring hop on ``case.rank``: the K and V (or dK and dV) of this ring rank's ``L/R`` tokens for
    the kv heads this ``sp`` rank holds, unexpanded."""
    c = case.config
    return case.batch * case.seq * case.shape.kv_heads * c.head_dim * 2 * case.dtype_bytes


def ring_records(case: Case) -> list[Record]:
    """The ring's point-to-point transfers of one block on ``case.rank`` as (phase, op, category, bytes received):
    ``R-1`` K/V hops forward; ``R-1`` K/V and ``R`` dK/dV hops backward. None without a ring. With every ring
    rank holding ``L/R`` tokens these are :func:`odysseus.plan.forms.ring_collectives`, the ledger's closed form,
    less their labels (tests/test_plan_ring.py checks it)."""
    R, b = case.ring, hop_bytes(case)
    if R == 1:
        return []
    return [("forward", "send_recv", "activation", b)] * (R - 1) + [("backward", "send_recv", "activation", b)] * (
        2 * R - 1
    )


def crosses_nodes(case: Case, hw: Hardware) -> bool:
    """The ring's hops leave the node: its ranks are ``sp`` apart, so ``R * S`` ranks must fit in one node."""
    return case.ring * case.world > hw.gpus_per_node


def attention_steps(case: Case, hw: Hardware, a: Assumptions) -> tuple[list[float], list[float], float]:
    """(forward seconds, backward seconds) of each ring step on ``case.rank``, and the forward flops: each step
    as slow as its slowest ring rank (:func:`step_pairs`), the kernel efficiency of ``L/R`` tokens from
    :mod:`~odysseus.plan.efficiency` (step 0 causal, later steps full blocks); backward 2.5x the flops. R = 1
    is one causal call over ``seq``: the model without a ring."""
    c, R = case.config, case.ring
    per_pair = 4 * case.batch * case.shape.q_heads * c.head_dim  # QK^T and PV, 2 flops per multiply-add
    pairs = step_pairs(chunk_sizes(case.seq * R, R), R, c.causal)
    fwd, bwd = [], []
    for s, row in enumerate(pairs):
        flops = max(row) * per_pair
        causal = c.causal and s == 0
        eff_f = attention_efficiency(hw, a, case.seq, c.head_dim, "forward", causal)
        eff_b = attention_efficiency(hw, a, case.seq, c.head_dim, "backward", causal)
        fwd.append(flops / (hw.peak_flops * eff_f))
        bwd.append(2.5 * flops / (hw.peak_flops * eff_b))
    return fwd, bwd, sum(row[0] for row in pairs) * per_pair


def ring_exposed(
    ring: int, hop_s: float, overlap: float, fwd: list[float], bwd: list[float], passes: int
) -> tuple[float, int]:
    """(exposed seconds, hops) of one block's ring transfers of ``hop_s`` seconds each: forward hop ``s`` travels
    during step ``s`` (``passes`` forwards with recomputation); backward step ``s`` carries the next K/V block and
    the previous step's dK/dV on the same link; the last dK/dV hop home is exposed. ``overlap`` of the shorter of
    a step's transfers and its attention (``fwd``/``bwd`` seconds per step) hides."""
    if ring == 1:
        return 0.0, 0
    exposed = passes * sum(hop_s - overlap * min(hop_s, fwd[s]) for s in range(ring - 1))
    for s in range(ring):
        load = hop_s * ((s < ring - 1) + (s > 0))
        exposed += load - overlap * min(load, bwd[s])
    return exposed + hop_s, passes * (ring - 1) + 2 * ring - 1


def _backward_tile_loop(B: int, T: int, hq: int, Q: int, causal: bool) -> int:
    """Peak bytes inside ``block_backward``'s tile loop over a ``T x T`` block beyond its whole-block buffers.

    A row tile of ``r`` queries holds its rows and output gradient, its dQ tile (fp32, ``r * Q`` each), the row
    dot and the lse (fp32, ``r`` per head) and the dQ tiles of the rows before. With one key tile the peak is at
    dS (P, the einsum's scores and them less the row dot: ``r x T`` fp32 per head) or at dQ's update (P, dS and
    the einsum's result with its scaled copy), whichever is larger. With more, it
    is at the next key tile's mask fill: the last tile's P and dS are still bound while the new scores, their
    masked copy and the negated mask tile are made."""
    tk1 = min(TILE, T - TILE)
    best = 0
    for before in {(T - 1) // TILE * TILE, max(0, T // TILE - 1) * TILE}:  # the last row tile, the last full one
        r = min(TILE, T - before)
        rows = 3 * r * Q + 2 * B * hq * r * FP32 + before * Q
        if T <= TILE:  # P and dS, and dS's einsum (result, less the row dot) or dQ's (result, scaled copy)
            tiles = 2 * B * hq * r * T * FP32 + max(B * hq * r * T * FP32, 2 * r * Q)
        else:
            tiles = 2 * B * hq * r * (TILE + tk1) * FP32 + (r * tk1 if causal else 0)
        best = max(best, rows + tiles)
    return best


def _forward_block(B: int, T: int, hq: int, Q: int, causal: bool) -> int:
    """Peak bytes of ``block_forward`` over a ``T x T`` block and the ring's merge of its result, beyond the
    ring's running output and lse. Inside: K and V expanded in fp32 (``T * Q`` each), the outputs and lse of the
    row tiles before, the row's queries, running output and lse; with one key tile the peak is at the exponent
    (scores, scores less lse, their exp), with more at the next key tile's mask fill (the last tile's scores
    still bound beside the new ones, their masked copy and the negated mask tile). After: the tiles' outputs
    and lse concatenated beside the list; the merge's weights and products."""
    lse_row = B * hq * FP32
    tk1 = min(TILE, T - TILE)
    loop = 0
    for before in {(T - 1) // TILE * TILE, max(0, T // TILE - 1) * TILE}:
        r = min(TILE, T - before)
        rows = before * (Q + lse_row) + r * Q
        if T <= TILE:  # the first key tile's lse is all the row has
            tiles = 3 * B * hq * r * T * FP32 + r * lse_row
        else:  # the first key tile's output and lse, the row's running ones
            tiles = B * hq * r * (TILE + 2 * tk1) * FP32 + (r * tk1 if causal else 0) + r * Q + r * lse_row
        loop = max(loop, rows + tiles)
    inside = 2 * T * Q + max(loop, 2 * T * (Q + lse_row))
    merge = T * (Q + lse_row) + 3 * T * Q + 4 * T * lse_row
    return max(inside, merge)


def ring_transients(case: Case) -> tuple[int, int]:
    """(forward, backward) bytes the ring attention holds beyond the block's saved tensors on ``case.rank``, at
    ring step 0 (the diagonal block: every query against every key of this ring rank; later steps meet half).

    What ``comm.ring`` and ``ops.ring_attention`` allocate, with ``T = L/R`` tokens, ``Q`` the fp32 bytes of one
    token's query heads, scores tiled ``TILE x TILE`` in fp32 (checked against MemoryTracker by
    ``perf/memory.py``):

    - both: every ring rank's token indices (int64, the ring's plan, held from forward to backward); the causal
      mask is made a score tile at a time (``ops.ring_attention.TileMask``), inside the tile terms;
    - forward: the stacked K/V block and the one arriving (:func:`hop_bytes` each), the fp32 running output and
      lse, K and V expanded to the query heads in fp32, and a tile's query rows in fp32 with two score tiles;
    - backward: the stacked K/V, the dK/dV buffer and the block arriving; the fp32 dQ accumulator, K, V, dK, dV
      expanded in fp32 (``T * Q`` each) and the tile loop (:func:`_backward_tile_loop`).

    Nothing grows faster than ``T``: O(L/(R*S)) per rank, plus tiles of a fixed size."""
    if case.ring == 1:
        return 0, 0
    B, T, hq, causal = case.batch, case.seq, case.shape.q_heads, case.config.causal
    Q, kv = B * hq * case.config.head_dim * FP32, hop_bytes(case)
    both = case.ring * T * 8
    forward = both + 2 * kv + T * Q + B * hq * T * FP32 + _forward_block(B, T, hq, Q, causal)
    backward = both + 3 * kv + 5 * T * Q + _backward_tile_loop(B, T, hq, Q, causal)
    return forward, backward


# --- weights over the ring ------------------------------------------------------------------------------


def zero3_view(case: Case) -> Case:
    """The case FSDP2's forms (``forms.zero3_records``, which read only the spec, the config, ``world`` and ``rank``)
    see: its ``world`` is ``ring x sp``, the group ZeRO-3 shards over."""
    return dataclasses.replace(case, world=case.world * case.ring, ring=1) if case.ring > 1 else case


def ring_weight_numel(case: Case) -> dict[str, tuple[int, int]]:
    """``forms.weight_numel`` on a ring: under ZeRO-3 the parts FSDP2 shards hold ``ceil(dim0 / (R*S))`` padded
    rows (rank 0's shard: the largest); the head- or column-split parts are as over ``sp``."""
    out = weight_numel(case)
    if not (case.variant.zero3 and case.ring > 1):
        return out
    whole, n = set(case.spec.replicated), case.world * case.ring
    sharded = {"ffn": set(FFN_WEIGHTS) <= whole, "norms": case.spec.sequence_split}
    sharded["attention"] = set(ATTENTION_WEIGHTS) <= whole
    for part, unit in zip(("ffn", "norms", "attention"), _fsdp_units_by_part(case)):
        if sharded[part]:
            shards = [_fsdp_local(dim0, rest, n, 0) for dim0, rest in unit]
            out[part] = (sum(p for p, _ in shards), sum(u for _, u in shards))
    return out


def ring_grad_records(case: Case, layers: int, vocab_size: int, tied: bool) -> list[tuple[str, int, int]]:
    """What one step sums over the ring on ``case.rank`` as ``(who, bytes received, collectives)``: without ZeRO-3,
    every gradient (``data_parallel.dp_step_records`` over R); with it, only the weights FSDP2 leaves alone (its
    reduce-scatters over ``ring x sp`` already sum the rest)."""
    if case.ring == 1:
        return []
    if not case.variant.zero3:
        return dp_step_records(case, case.ring, layers, vocab_size, tied)
    numel = layers * dp_grad_numel(case, "hybrid")
    return [("finalize_grads", all_reduce_bytes(numel, case.ring, 0, case.dtype_bytes), 1)] if numel else []
