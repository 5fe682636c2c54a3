"""Process groups: what callers may pass, and the host-side exchange of sequence lengths."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..layout import check_layout
from ._compat import all_gather_tensor
from .failures import named_failures
from .ledger import record

try:
    from torch.distributed.device_mesh import DeviceMesh
except ImportError:  # pragma: no cover - torch builds without distributed
    DeviceMesh = ()

_META_GROUPS: dict = {}


def resolve_group(group=None) -> dist.ProcessGroup | None:
    """Turn ``None``, a ``ProcessGroup`` or a 1-D ``DeviceMesh`` into a ``ProcessGroup``.

    ``None`` means the default group, or no group at all (a single process) when torch.distributed has
    not been initialised; every collective is then the identity.
    """
    if group is None:
        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"expected a 1-D DeviceMesh, got one with {group.ndim} dims {tuple(group.shape)}; "
                "slice it first, e.g. mesh['sp']"
            )
        return group.get_group()
    if isinstance(group, dist.ProcessGroup):
        return group
    raise TypeError(f"expected a ProcessGroup, a 1-D DeviceMesh or None, got {type(group).__name__}")


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


@torch.compiler.disable  # host-side ints: run eagerly rather than trace a data-dependent exchange
def exchange_lengths(
    local_len: int, pg: dist.ProcessGroup | None, who: str = "sequence", finite: bool | None = None
) -> list[int]:
    """Every rank's sequence-shard length, checked against the :func:`shard_sizes` rule.

    All ranks see the same list, so a bad layout raises the same ``ValueError`` on every rank. With
    ``finite`` (whether this rank's input is free of NaN/Inf), a non-finite input on any rank raises on all.
    """
    world = group_size(pg)
    report = [local_len] if finite is None else [local_len, int(finite)]
    if world == 1:
        every = [report]
    else:
        mine = torch.tensor(report, dtype=torch.int64)
        gathered = torch.empty(world * len(report), dtype=torch.int64)
        with named_failures(f"{who}: length exchange"):
            all_gather_tensor(gathered, mine, group=meta_group(pg))
        record("all_gather", mine.nbytes * (world - 1), mine.nbytes * (world - 1), world, "metadata", "lengths")
        every = gathered.view(world, len(report)).tolist()
    if finite is not None:
        bad = [r for r, (_, ok) in enumerate(every) if not ok]
        if bad:
            raise ValueError(f"{who}: the input holds NaN or Inf on rank(s) {bad} (check_finite=True)")
    lengths = [e[0] for e in every]
    check_layout(lengths, who)
    return lengths
