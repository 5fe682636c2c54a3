"""How sequences and heads are split over ranks: the arithmetic lives in :mod:`odysseus.layout`."""

from ..layout import head_ranges, kv_range, offsets, shard_sizes

__all__ = ["head_ranges", "kv_range", "offsets", "shard_sizes"]
