"""The host-side exchange of sequence lengths every module makes before its collectives, and the checks it
carries: the layout (``shard_sequence``'s split, or equal lengths for TP), NaN/Inf, input fingerprints and
the verdicts of checks that may differ between ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..layout import check_layout
from ._compat import all_gather_tensor
from .failures import named_failures
from .groups import group_size, meta_group
from .ledger import record
from .verdict import raise_agreed


def fingerprint(x: torch.Tensor) -> list[int]:
    """Two fp64 sums of ``x`` (plain and absolute) as int64 bit patterns: equal inputs give equal patterns.

    Reading them synchronises the host with ``x``'s device, which is why ``check_inputs`` is opt-in."""
    sums = torch.stack([x.sum(dtype=torch.float64), x.abs().sum(dtype=torch.float64)]).cpu()
    return sums.view(torch.int64).tolist()


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
) -> list[int]:
    """Every rank's sequence length, checked: the :func:`shard_sizes` rule, or equal lengths if ``replicated``
    (every rank holds the whole sequence, as in TP).

    All ranks see the same list, so a bad layout raises the same ``ValueError`` on every rank. The same
    exchange carries verdicts that must agree: ``finite`` (whether this rank's input is free of NaN/Inf),
    ``error`` (a check this rank failed; every rank then raises it, :mod:`.verdict`) and ``prints``
    (:func:`fingerprint` of the input: identical on every rank means the full sequence was fed to a
    sequence-split module; different means shards were fed to a replicated one). Every rank must pass
    ``finite`` and ``prints`` alike (None or not).
    """
    world = group_size(pg)
    report = [local_len, int(error is not None)] + ([] if finite is None else [int(finite)]) + (prints or [])
    if world == 1:
        every = [report]
    else:
        mine = torch.tensor(report, dtype=torch.int64)
        gathered = torch.empty(world * len(report), dtype=torch.int64)
        with named_failures(f"{who}: length exchange"):
            all_gather_tensor(gathered, mine, group=meta_group(pg))
        record("all_gather", mine.nbytes * (world - 1), mine.nbytes * (world - 1), world, "metadata", "lengths", pg)
        every = gathered.view(world, len(report)).tolist()
    raise_agreed([bool(e[1]) for e in every], error, pg, who)
    if finite is not None:
        bad = [r for r, e in enumerate(every) if not e[2]]
        if bad:
            where = f"rank {bad[0]}" if len(bad) == 1 else f"ranks {bad}"
            raise ValueError(f"{who}: the input holds NaN or Inf on {where} (check_finite=True)")
    lengths = [e[0] for e in every]
    if replicated:
        check_replicated(lengths, who)
    else:
        check_layout(lengths, who)
    if prints and world > 1:
        check_prints([tuple(e[len(e) - len(prints) :]) for e in every], lengths, replicated, who)
    return lengths


def check_replicated(lengths: list[int], who: str) -> None:
    """Raise unless every rank holds the same number of tokens (a replicated, TP, layout)."""
    if len(set(lengths)) > 1:
        raise ValueError(
            f"{who}: the ranks hold sequences of lengths {lengths}; a tensor-parallel ('tp') module takes the "
            "whole sequence on every rank, not odysseus.shard_sequence shards"
        )


def check_prints(prints: list[tuple], lengths: list[int], replicated: bool, who: str) -> None:
    """Raise where the inputs' fingerprints contradict the layout (``check_inputs=True``)."""
    same = len(set(prints)) == 1
    if replicated and not same:
        groups = sorted({tuple(r for r, p in enumerate(prints) if p == q) for q in prints})
        raise ValueError(
            f"{who}: the ranks hold different inputs (ranks grouped by equal input: {groups}); a "
            "tensor-parallel ('tp') module takes the same whole sequence on every rank (check_inputs=True)"
        )
    if not replicated and same and len(set(lengths)) == 1:
        raise ValueError(
            f"{who}: every rank holds the same {lengths[0]} tokens; a sequence-split module takes each rank's "
            "odysseus.shard_sequence shard of the sequence, not the whole sequence on every rank "
            "(check_inputs=True compares the ranks' inputs)"
        )
