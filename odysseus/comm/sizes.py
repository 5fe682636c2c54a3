"""How sequences and heads are split over ranks: pure arithmetic, no communication.

The rule everywhere: ``n = q*world + r`` items go ``q+1`` to each of the first ``r`` ranks and ``q`` to the rest.
"""

from __future__ import annotations


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


def head_ranges(num_heads: int, world: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` query-head range of every rank (uneven when ``world`` does not divide heads)."""
    if num_heads < world:
        raise ValueError(
            f"cannot split num_heads={num_heads} over world size {world}: every rank needs at least one head"
        )
    o = offsets(shard_sizes(num_heads, world))
    return [(o[i], o[i + 1]) for i in range(world)]


def kv_range(q_range: tuple[int, int], q_per_kv: int) -> tuple[int, int]:
    """The ``[start, end)`` kv heads that query heads ``q_range`` read under GQA."""
    start, end = q_range
    return start // q_per_kv, (end - 1) // q_per_kv + 1
