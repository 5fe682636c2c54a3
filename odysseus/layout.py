"""Where every piece of a split layer lives: pure arithmetic, no torch.nn and no torch.distributed.

The rule everywhere: ``n = q*world + r`` items go ``q+1`` to each of the first ``r`` ranks and ``q`` to the
rest, for tokens, query heads and FFN columns alike. A rank's kv heads are those its query heads read; a kv
head read by query heads of several ranks is held by each of them. The planner, the byte rules of the
ledger and the modules all take their shapes from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TransformerConfig


def shard_sizes(n: int, world: int) -> list[int]:
    """Sizes of the ``world`` contiguous shards of ``n`` items (the first ``n % world`` are one larger)."""
    if world <= 0:
        raise ValueError(f"world size must be positive, got {world}")
    if n < 0:
        raise ValueError(f"cannot split a negative length {n}")
    q, r = divmod(n, world)
    return [q + 1 if i < r else q for i in range(world)]


def offsets(sizes: list[int]) -> list[int]:
    """Prefix sums: ``offsets([3, 2])`` is ``[0, 3, 5]``."""
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def ring_chunks(n: int, ring: int) -> list[list[tuple[int, int]]]:
    """The ``[start, end)`` token ranges each of ``ring`` ring ranks holds: the sequence is cut into ``2*ring``
    chunks (:func:`shard_sizes`) and rank i holds chunks i and ``2*ring-1-i``, one from the head and one from the
    tail, so that every rank does the same causal work. Ascending; an empty chunk is left out."""
    o = offsets(shard_sizes(n, 2 * ring))
    return [[(o[c], o[c + 1]) for c in (i, 2 * ring - 1 - i) if o[c + 1] > o[c]] for i in range(ring)]


def ring_shards(n: int, ring: int, sp: int) -> list[list[tuple[int, int]]]:
    """Token ranges of every rank of a (ring, sp) mesh, rank ``i*sp + s`` at ring rank i, sp rank s: ring rank
    i's tokens (both its chunks, in order) split over the sp ranks by :func:`shard_sizes`."""
    out = []
    for chunks in ring_chunks(n, ring):
        local = offsets(shard_sizes(sum(e - s for s, e in chunks), sp))
        for j in range(sp):
            out.append(_slice_ranges(chunks, local[j], local[j + 1]))
    return out


def _slice_ranges(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The global ranges of local tokens ``[start, end)`` of the concatenation of ``ranges``."""
    out, seen = [], 0
    for s, e in ranges:
        lo, hi = max(start - seen, 0), min(end - seen, e - s)
        if hi > lo:
            out.append((s + lo, s + hi))
        seen += e - s
    return out


def split_ranges(n: int, world: int, what: str) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` ranges of ``n`` items over ``world`` ranks; every rank needs one."""
    if n < world:
        raise ValueError(f"cannot split {what}={n} over world size {world}: every rank needs at least one")
    o = offsets(shard_sizes(n, world))
    return [(o[j], o[j + 1]) for j in range(world)]


def head_ranges(num_heads: int, world: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` query-head range of every rank (uneven when ``world`` does not divide heads)."""
    return split_ranges(num_heads, world, "num_heads")


def kv_range(q_range: tuple[int, int], q_per_kv: int) -> tuple[int, int]:
    """The ``[start, end)`` kv heads that query heads ``q_range`` read under GQA."""
    start, end = q_range
    return start // q_per_kv, (end - 1) // q_per_kv + 1


def rows(ranges, width: int) -> list[tuple[int, int]]:
    """Head ranges -> row ranges of a projection whose heads are ``width`` wide."""
    return [(s * width, e * width) for s, e in ranges]


def uniform_gqa(kv_of_q: list[int], num_kv: int) -> bool:
    """True when query head i reads kv head ``i // (len(kv_of_q) // num_kv)`` for every i (attention kernels
    then take GQA natively; otherwise kv heads are expanded to one per query head)."""
    n = len(kv_of_q)
    return n % num_kv == 0 and all(kv == i // (n // num_kv) for i, kv in enumerate(kv_of_q))


@dataclass(frozen=True)
class HeadSplit:
    """Query and kv heads of every rank when heads are split over ``world`` ranks."""

    q: tuple[tuple[int, int], ...]
    kv: tuple[tuple[int, int], ...]
    kv_of_q: tuple[int, ...]
    """For this rank's local query heads: which local kv head each reads."""
    shared_kv: bool
    """Some kv head lives on several ranks (its gradient then needs summing)."""

    @classmethod
    def build(cls, config: TransformerConfig, world: int, rank: int) -> HeadSplit:
        q = tuple(head_ranges(config.num_heads, world))
        kv = tuple(kv_range(r, config.q_per_kv) for r in q)
        (qs, qe), (ks, _) = q[rank], kv[rank]
        kv_of_q = tuple(h // config.q_per_kv - ks for h in range(qs, qe))
        shared = any(kv[j][1] > kv[j + 1][0] for j in range(world - 1))
        return cls(q, kv, kv_of_q, shared)


def dense_shapes(c: TransformerConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer of the dense block, by Hugging Face name."""
    qd, kvd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {
        "q_proj": (qd, c.hidden_size),
        "k_proj": (kvd, c.hidden_size),
        "v_proj": (kvd, c.hidden_size),
        "o_proj": (c.hidden_size, qd),
        "gate_proj": (c.intermediate_size, c.hidden_size),
        "up_proj": (c.intermediate_size, c.hidden_size),
        "down_proj": (c.hidden_size, c.intermediate_size),
    }


def has_bias(c: TransformerConfig, name: str) -> bool:
    """Whether the dense linear layer ``name`` carries a bias under ``c`` (``qkv_bias``, ``o_bias``, ``mlp_bias``)."""
    if name in ("q_proj", "k_proj", "v_proj"):
        return c.qkv_bias
    if name == "o_proj":
        return c.o_bias
    if name in ("gate_proj", "up_proj", "down_proj"):
        return c.mlp_bias
    raise ValueError(f"unknown linear layer {name!r}; expected one of {tuple(dense_shapes(c))}")


def check_layout(lengths: list[int], who: str = "sequence") -> None:
    """Raise unless ``lengths`` is what :func:`odysseus.shard_sequence` gives for ``sum(lengths)`` tokens."""
    total, world = sum(lengths), len(lengths)
    if total < world:
        raise ValueError(f"{who}: a sequence of {total} tokens cannot be split over {world} ranks")
    expected = shard_sizes(total, world)
    if lengths != expected:
        raise ValueError(
            f"{who}: the ranks hold shards of lengths {lengths}, but shard_sequence splits a sequence of "
            f"{total} tokens over {world} ranks as {expected}; was the full sequence (or a wrongly split "
            "one) passed to a sequence-parallel module?"
        )


# --- bytes on the wire: the one rule per collective, for the ledger and the planner's closed forms --------


def gather_bytes(sizes: list[int], rank: int, row_bytes: int) -> tuple[int, int]:
    """(sent, received) bytes of an all-gather where rank i holds ``sizes[i]`` rows of ``row_bytes``."""
    return (len(sizes) - 1) * sizes[rank] * row_bytes, (sum(sizes) - sizes[rank]) * row_bytes


def scatter_bytes(sizes: list[int], rank: int, row_bytes: int) -> tuple[int, int]:
    """(sent, received) bytes of a reduce-scatter where rank i keeps ``sizes[i]`` rows of ``row_bytes``."""
    return (sum(sizes) - sizes[rank]) * row_bytes, (len(sizes) - 1) * sizes[rank] * row_bytes


def all_reduce_bytes(numel: int, world: int, rank: int, elem_bytes: int) -> int:
    """Bytes one rank sends (and receives) in an all-reduce of ``numel`` elements: a reduce-scatter of
    ``numel`` split by :func:`shard_sizes`, then an all-gather of the reduced chunks."""
    if world == 1:
        return 0
    chunks = shard_sizes(numel, world)
    return ((numel - chunks[rank]) + (world - 1) * chunks[rank]) * elem_bytes


RMSNORM_CHUNK_ROWS = 4096
"""Rows (tokens x batch) whose fp32 temporaries the fused RMSNorm (``odysseus.ops.rmsnorm``) holds at once, in
forward and backward. Backward needs three fp32 tensors of its rows (12 bytes per element), forward an fp32
upcast and its square; over a whole long shard they would be the largest transient of a checkpointed layer
(21 GB for Llama-3-8B at 435K tokens per rank), over a chunk they are 200 MB."""


def norm_chunk_tokens(shape: tuple[int, ...]) -> int:
    """Tokens of the token dim (-2) per fused-RMSNorm chunk of an input of ``shape`` (at least 2-D):
    ``RMSNORM_CHUNK_ROWS`` rows in all, over the leading dims."""
    lead = 1
    for n in shape[:-2]:
        lead *= n
    return max(1, min(shape[-2], RMSNORM_CHUNK_ROWS // max(lead, 1)))
