"""CommLedger: a record of every collective the library issues, with its bytes per rank.

Call sites report what they really send and receive; nothing here derives volumes from formulas.
Records are taken in eager mode (under ``torch.compile`` a call site reports once, while tracing).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_ACTIVE: list[CommLedger] = []


@dataclass(frozen=True)
class CommRecord:
    """One collective as seen by this rank."""

    op: str
    """``all_gather``, ``reduce_scatter``, ``all_to_all``, ``all_reduce``."""
    phase: str
    """``forward`` or ``backward`` (inside autograd's backward pass)."""
    bytes_sent: int
    """Bytes of this rank's data that leave it."""
    bytes_received: int
    """Bytes this rank must receive from the others."""
    group_size: int
    category: str = "activation"
    """What moves: ``activation``, ``gradient`` (weight-gradient sync), ``weight``, ``metadata``."""
    label: str = ""
    """Where it was issued, e.g. ``attn.qkv``."""
    dim: str = ""
    """The mesh dim of its group, ``sp`` or ``dp``, where the group belongs to a 2-D mesh (else empty)."""


class CommLedger:
    """Context manager collecting a :class:`CommRecord` per collective issued while it is active.

    >>> with CommLedger() as ledger:
    ...     loss = block(x).sum(); loss.backward()
    >>> ledger.total("op")          # {'all_gather': ..., 'reduce_scatter': ...}
    """

    def __init__(self) -> None:
        self.records: list[CommRecord] = []

    def __enter__(self) -> CommLedger:
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)

    def select(self, **match) -> list[CommRecord]:
        """Records whose attributes equal every ``match`` value, e.g. ``select(phase="forward")``."""
        return [r for r in self.records if all(getattr(r, k) == v for k, v in match.items())]

    def bytes(self, field: str = "bytes_received", **match) -> int:
        """Sum of ``field`` over the matching records."""
        return sum(getattr(r, field) for r in self.select(**match))

    def total(self, by: str = "op", field: str = "bytes_received", **match) -> dict[str, int]:
        """``field`` summed per value of attribute ``by`` (``op``, ``phase``, ``category``, ``label`` or ``dim``)."""
        out: dict[str, int] = defaultdict(int)
        for r in self.select(**match):
            out[getattr(r, by)] += getattr(r, field)
        return dict(out)

    def count(self, by: str = "op", **match) -> dict[str, int]:
        """Number of records per value of attribute ``by``."""
        out: dict[str, int] = defaultdict(int)
        for r in self.select(**match):
            out[getattr(r, by)] += 1
        return dict(out)

    def table(self) -> str:
        """A markdown table of the records, one row per (phase, op, category, label), with counts."""
        rows: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
        for r in self.records:
            acc = rows[(r.phase, r.op, r.category, r.label)]
            acc[0] += 1
            acc[1] += r.bytes_sent
            acc[2] += r.bytes_received
        lines = ["| phase | op | category | label | calls | sent B | received B |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {p} | {o} | {c} | {lb} | {n} | {s} | {rv} |" for (p, o, c, lb), (n, s, rv) in rows.items()]
        return "\n".join(lines)


_PHASE: list[str] = []
_DIMS: dict[str, str] = {}  # process group name -> its mesh dim


def name_group(pg, dim: str) -> None:
    """Record ``pg``'s collectives under mesh dim ``dim`` (``sp`` or ``dp``) from now on."""
    if pg is not None:
        _DIMS[pg.group_name] = dim


@contextmanager
def phase(name: str):
    """Report collectives issued inside as ``name`` (e.g. gradient sync after ``backward()`` returned)."""
    _PHASE.append(name)
    try:
        yield
    finally:
        _PHASE.pop()


def current_phase() -> str:
    """``backward`` inside an autograd backward pass (or a :func:`phase` block), else ``forward``."""
    if _PHASE:
        return _PHASE[-1]
    return "backward" if torch._C._current_graph_task_id() != -1 else "forward"


def record(
    op: str,
    bytes_sent: int,
    bytes_received: int,
    group_size: int,
    category: str = "activation",
    label: str = "",
    group=None,
) -> None:
    """Report one collective on process group ``group`` to every active ledger (a no-op when none is active)."""
    if not _ACTIVE:
        return
    dim = "" if group is None else _DIMS.get(group.group_name, "")
    rec = CommRecord(op, current_phase(), int(bytes_sent), int(bytes_received), group_size, category, label, dim)
    for ledger in _ACTIVE:
        ledger.records.append(rec)
