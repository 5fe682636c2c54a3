"""Process groups: their size, this rank's place in them, and a gloo twin for host-side exchanges.

The leaf of :mod:`odysseus.comm`: it imports nothing of odysseus, so every other module may use it."""

from __future__ import annotations

import torch.distributed as dist

_META_GROUPS: dict = {}


def group_size(pg: dist.ProcessGroup | None) -> int:
    return 1 if pg is None else dist.get_world_size(pg)


def group_rank(pg: dist.ProcessGroup | None) -> int:
    return 0 if pg is None else dist.get_rank(pg)


def meta_group(pg: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """A gloo group over the same ranks, for small host-side exchanges.

    Lengths travel on the CPU so that reading them never waits for the GPU stream. Every rank of ``pg``
    must call this the first time (modules do it in their constructors).
    """
    if pg is None or dist.get_backend(pg) == "gloo":
        return pg
    if pg not in _META_GROUPS:
        ranks = dist.get_process_group_ranks(pg)
        _META_GROUPS[pg] = dist.new_group(ranks, backend="gloo", use_local_synchronization=True)
    return _META_GROUPS[pg]
