"""The host-side exchange of sequence lengths every module makes before its collectives, and the checks it
carries: the layout (``shard_sequence``'s split, or equal lengths for TP), batch and hidden size, NaN/Inf,
input fingerprints (:mod:`.prints`) and the verdicts of checks that may differ between ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..layout import check_layout
from ._compat import all_gather_tensor
from .failures import named_failures
from .groups import group_size, meta_group
from .ledger import record
from .prints import check_prints
from .verdict import raise_agreed


def gather_ints(report: list[int], pg: dist.ProcessGroup | None, who: str) -> list[list[int]]:
    """Every rank's ``report`` (the same number of ints on each) over ``pg``'s gloo twin, the same list on every
    rank: one all-gather, recorded as the length exchange it is part of."""
    world = group_size(pg)
    if world == 1:
        return [list(report)]
    mine = torch.tensor(report, dtype=torch.int64)
    gathered = torch.empty(world * len(report), dtype=torch.int64)
    with named_failures(f"{who}: length exchange"):
        all_gather_tensor(gathered, mine, group=meta_group(pg))
    record("all_gather", mine.nbytes * (world - 1), mine.nbytes * (world - 1), world, "metadata", "lengths", pg)
    return gathered.view(world, len(report)).tolist()


@torch.compiler.disable  # host-side ints: run eagerly rather than trace a data-dependent exchange
def exchange_lengths(
    local_len: int,
    pg: dist.ProcessGroup | None,
    who: str = "sequence",
    finite: bool | None = None,
    *,
    replicated: bool = False,
    prints: list[int] | None = None,
    error: Exception | None = None,
    shape: tuple[int, int] | None = None,
    hint: str = "check_inputs=True",
) -> list[int]:
    """Every rank's sequence length, checked: the :func:`shard_sizes` rule, or equal lengths if ``replicated``
    (every rank holds the whole sequence, as in TP).

    All ranks see the same list, so a bad layout raises the same ``ValueError`` on every rank. The same
    exchange carries verdicts that must agree: ``finite`` (whether this rank's input is free of NaN/Inf),
    ``error`` (a check this rank failed; every rank then raises it, :mod:`.verdict`), ``shape`` (the input's
    ``(batch, hidden)``: a mismatch raises here, before a collective whose sizes disagree could abort the
    process) and ``prints`` (a :class:`~.prints.Fingerprinter` print of the input: identical on every rank
    means the full sequence was fed to a sequence-split module; different means shards were fed to a
    replicated one; ``hint`` says in the message how to turn that check off). Every rank must pass
    ``finite``, ``shape`` and ``prints`` alike (None or not).
    """
    world = group_size(pg)
    report = [local_len, int(error is not None)] + ([] if finite is None else [int(finite)])
    report += list(shape or ()) + (prints or [])
    every = gather_ints(report, pg, who)
    raise_agreed([bool(e[1]) for e in every], error, pg, who)
    if finite is not None:
        bad = [r for r, e in enumerate(every) if not e[2]]
        if bad:
            where = f"rank {bad[0]}" if len(bad) == 1 else f"ranks {bad}"
            raise ValueError(f"{who}: the input holds NaN or Inf on {where} (check_finite=True)")
    lengths = [e[0] for e in every]
    if shape is not None:
        at = 2 + (finite is not None)
        check_shapes([(e[at], n, e[at + 1]) for e, n in zip(every, lengths)], replicated, who)
    if replicated:
        check_replicated(lengths, who)
    else:
        check_layout(lengths, who)
    if prints and world > 1:
        check_prints([e[len(e) - len(prints) :] for e in every], lengths, replicated, who, hint)
    return lengths


def check_replicated(lengths: list[int], who: str) -> None:
    """Raise unless every rank holds the same number of tokens (a replicated, TP, layout)."""
    if len(set(lengths)) > 1:
        raise ValueError(
            f"{who}: the ranks hold sequences of lengths {lengths}; a tensor-parallel ('tp') module takes the "
            "whole sequence on every rank, not odysseus.shard_sequence shards"
        )


def check_shapes(shapes: list[tuple[int, int, int]], replicated: bool, who: str) -> None:
    """Raise unless every rank's input ``(batch, seq, hidden)`` has the same batch and hidden size."""
    if len({(b, h) for b, _, h in shapes}) > 1:
        each = ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
        seq = "seq" if replicated else "seq_local"
        raise ValueError(
            f"{who}: the ranks' inputs (batch, {seq}, hidden) differ in batch or hidden size ({each}); every "
            "rank of the group must be fed the same batch of sequences"
        )
