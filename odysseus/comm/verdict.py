"""Raise on every rank or on none: a check that fails on one rank must not leave its peers waiting.

A rank that raises on its own leaves the others blocked in the next collective until the process group's
timeout. So checks whose outcome may differ between ranks (a padding mask on one rank, positions that fit
one shard but not another) are exchanged first: each rank sends one flag, and if any rank failed, every
rank raises, with the failing ranks' messages (gathered in a second exchange, on the failure path only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ._compat import all_gather_tensor
from .failures import named_failures
from .groups import group_rank, group_size, meta_group
from .ledger import record

_TYPES = {t.__name__: t for t in (ValueError, TypeError, NotImplementedError)}


def attempt(check: Callable[[], object]) -> tuple[object, Exception | None]:
    """``(check(), None)``, or ``(None, the ValueError or TypeError it raised)``: a verdict to exchange."""
    try:
        return check(), None
    except (ValueError, TypeError) as err:
        return None, err


def raise_agreed(failed: list[bool], error: Exception | None, pg, who: str) -> None:
    """Every rank calls this with the same ``failed`` flags (one per rank, already exchanged) and its own
    ``error`` (None where it passed). If any rank failed, all raise the first failing rank's exception type
    with every failing rank's message; collective on the failure path."""
    if not any(failed):
        return
    world = group_size(pg)
    if world == 1:
        raise error
    mine = (type(error).__name__, str(error)) if error is not None else None
    every: list = [None] * world
    with named_failures(f"{who}: verdict exchange"):
        dist.all_gather_object(every, mine, group=meta_group(pg))
    bad = [(r, e) for r, e in enumerate(every) if e is not None]
    kind = _TYPES.get(bad[0][1][0], ValueError)
    if len({msg for _, (_, msg) in bad}) == 1:  # the same complaint everywhere: say it once
        where = f"rank(s) {[r for r, _ in bad]}"
        raise kind(f"{bad[0][1][1]} [raised on {where} of {world}; rank {group_rank(pg)} raises with them]")
    lines = "; ".join(f"rank {r}: {msg}" for r, (_, msg) in bad)
    raise kind(f"{who}: {lines} [rank {group_rank(pg)} raises with them]")


def agree(error: Exception | None, pg, who: str) -> None:
    """Exchange whether this rank's check failed (``error``) and raise on every rank if any did.

    Collective on ``pg``'s gloo side group: one small all-gather when all passed."""
    world = group_size(pg)
    if world == 1:
        if error is not None:
            raise error
        return
    mine = torch.tensor([int(error is not None)], dtype=torch.int64)
    flags = torch.empty(world, dtype=torch.int64)
    with named_failures(f"{who}: verdict exchange"):
        all_gather_tensor(flags, mine, group=meta_group(pg))
    record("all_gather", mine.nbytes * (world - 1), mine.nbytes * (world - 1), world, "metadata", "verdict")
    raise_agreed([bool(f) for f in flags.tolist()], error, pg, who)
