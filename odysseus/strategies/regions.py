"""Where a module's activations live on the ranks, and the collectives at its entry and exit.

A region is bound once, at construction, to the module's group and overlap backend:

- :class:`ReplicatedRegion` (TP): every rank holds the whole sequence. Entry: identity into a
  column-split GEMM (all-reduce of the gradient); exit: all-reduce after a row-split GEMM.
- :class:`SequenceRegion` (TP-SP, Odysseus, Ulysses): each rank holds its ``shard_sequence`` shard.
  Entry: all-gather⊗GEMM; exit: GEMM⊗reduce-scatter (:mod:`odysseus.overlap`, which may hide them).

``region.open(x, position_ids)`` checks the input's layout once per forward call and returns a
:class:`Span`, which carries the lengths the entry and exit need. So TP and the sequence-split strategies
run the same module code; only the region differs.

The check is one host-side exchange on every rank (:func:`odysseus.comm.exchange_lengths`), before any
collective of the call: the lengths (the :func:`shard_sequence` rule, or equal lengths for TP), and the
verdicts of the checks whose outcome may differ between ranks (the module's input check, position ids, a
wrapping ``DistributedDataParallel``, NaN/Inf with ``check_finite``, the batch and hidden size, the inputs'
fingerprints, :mod:`odysseus.comm.prints`), so that a failure raises on every rank at once instead of
leaving the others waiting.
"""

from __future__ import annotations

import torch

from .. import comm
from ..comm import exchange_lengths
from ..comm.prints import PRINT_LEN, Fingerprinter
from ..comm.verdict import attempt
from ..layout import offsets, shard_sizes
from ..overlap import ag_matmul, matmul_rs
from ..validation import check_not_in_ddp, normalize_position_ids


class Span:
    """One forward call through a region: ``sizes`` holds every rank's sequence length; ``prints`` the input
    fingerprint this rank sent in the call's exchange (None where inputs are not checked), which a ring compares
    over its own ranks too (strategies/ring_span.py)."""

    def __init__(self, region: Region, sizes: list[int], prints: list[int] | None = None):
        self.region, self.sizes, self.prints = region, sizes, prints

    @property
    def offset(self) -> int:
        """Global position of this rank's first token."""
        return offsets(self.sizes)[self.region.rank] if self.region.sequence_split else 0

    @property
    def total(self) -> int:
        """Length of the whole sequence."""
        return sum(self.sizes) if self.region.sequence_split else self.sizes[self.region.rank]

    def gather_matmul(self, x: torch.Tensor, w: torch.Tensor, label: str) -> torch.Tensor:
        """``x: (B, L_here, K)`` times a column-split ``w: (K, N)`` -> ``(B, L, N)`` over the whole sequence."""
        return self.region.gather_matmul(self, x, w, label)

    def matmul_scatter(self, h: torch.Tensor, w: torch.Tensor, label: str) -> torch.Tensor:
        """Partial sums ``h: (B, L, K_r)`` times a row-split ``w: (K_r, N)`` -> ``(B, L_here, N)``, summed."""
        return self.region.matmul_scatter(self, h, w, label)

    def positions(self, position_ids: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """Positions ``(batch or 1, L)`` of the whole sequence; given ones follow the input's layout."""
        return self.region.positions(self, position_ids, batch, device)

    def tiles(self, tokens: int) -> list[tuple[Span, int, int]]:
        """This call cut into tiles of about ``tokens`` tokens per rank, for token-wise work (an FFN):
        ``(span of the tile, first, end)`` with ``[first, end)`` this rank's rows of the tile.

        Every rank's rows are cut into the same number of pieces (:func:`odysseus.layout.shard_sizes`), so
        the ranks run the tiles' collectives in step; a tile holds the pieces of the same index.
        """
        count = max(1, min(-(-max(self.sizes) // tokens), min(self.sizes)))  # no rank gets an empty piece
        pieces = [shard_sizes(n, count) for n in self.sizes]
        mine = offsets(pieces[self.region.rank])
        return [(Span(self.region, [p[t] for p in pieces]), mine[t], mine[t + 1]) for t in range(count)]


class Region:
    """Base: the module's group, rank and settings; subclasses define the layout and its collectives.

    From the module (:class:`~odysseus.strategies.module.ParallelModule`): the overlap ``backend``,
    ``save_input`` and ``ring``; ``check_finite`` (reject NaN/Inf inputs) and ``check_inputs`` (compare the
    ranks' inputs, a cheap fingerprint, to catch the whole sequence fed to every rank of a sequence-split
    module, or shards fed to a TP one, whose lengths alone can look right: None, the default, checks without
    waiting for the device, :mod:`odysseus.comm.prints`; True waits, every call; False does not check).
    """

    sequence_split: bool

    def __init__(self, module, who: str):
        self.pg, self.rank, self.backend, self.who = module.pg, module.rank, module.backend, who
        self.dp = module.mesh.dp
        self.check_finite, self.check_inputs = module.check_finite, module.check_inputs
        self.save_input, self.ring = module.save_input, module.ring
        # check_inputs None: the cheap entry check (no host wait); True: every call, waiting; False: none.
        self.printer = None if module.check_inputs is False else Fingerprinter(sync=module.check_inputs is True)
        self.given_prints: tuple[list[int], str] | None = None  # a model's entry print, for the next open only

    @torch.compiler.disable  # host-side checks and ints: one graph break, as the exchange always was
    def open(self, x: torch.Tensor, position_ids: torch.Tensor | None = None, check=None) -> Span:
        """Check ``x: (batch, seq_here, hidden)`` and ``position_ids`` (in ``x``'s layout) on every rank at once;
        ``check``: the module's own input check (dtype, device, width), run here so that it too raises on
        every rank."""

        def local_checks() -> None:
            if check is not None:
                check()
            check_not_in_ddp(self.pg, self.who, self.dp)
            if position_ids is not None:
                normalize_position_ids(position_ids, x.shape[0], x.shape[1], 0, x.device)

        _, error = attempt(local_checks)
        ok = error is None
        finite = (bool(torch.isfinite(x).all()) if ok else True) if self.check_finite else None
        prints, hint = self._prints(x if ok else None)
        sizes = exchange_lengths(
            x.shape[1] if ok else 0, self.pg, self.who, finite, replicated=not self.sequence_split, prints=prints,
            error=error, shape=(x.shape[0], x.shape[-1]) if ok else (0, 0), hint=hint,
        )  # fmt: skip
        return Span(self, sizes, prints)

    def _prints(self, x: torch.Tensor | None) -> tuple[list[int] | None, str]:
        """(this call's input print, or None where this region does not check; how to turn the check off)."""
        given, self.given_prints = self.given_prints, None
        if given is not None:
            return given
        if self.printer is None:
            return None, ""
        hint = "check_inputs=True" if self.printer.sync else "checked by default; check_inputs=False turns it off"
        return (self.printer([x]) if x is not None else [0] * PRINT_LEN), hint

    def __repr__(self) -> str:
        return type(self).__name__


class ReplicatedRegion(Region):
    """Every rank holds the whole sequence (TP)."""

    sequence_split = False

    def gather_matmul(self, span: Span, x: torch.Tensor, w: torch.Tensor, label: str) -> torch.Tensor:
        return comm.copy_to_tp(x, self.pg, label) @ w

    def matmul_scatter(self, span: Span, h: torch.Tensor, w: torch.Tensor, label: str) -> torch.Tensor:
        return comm.reduce_from_tp(h @ w, self.pg, label)

    def positions(self, span: Span, position_ids, batch: int, device: torch.device) -> torch.Tensor:
        return normalize_position_ids(position_ids, batch, span.total, 0, device)


class SequenceRegion(Region):
    """Each rank holds its ``shard_sequence`` shard (TP-SP, Odysseus, Ulysses)."""

    sequence_split = True

    # The backend is resolved by odysseus.overlap once per (group, device, dtype) and cached there ("auto"
    # may probe symm the first time); the region only carries the user's choice, validated at construction.
    def gather_matmul(self, span: Span, x: torch.Tensor, w: torch.Tensor, label: str) -> torch.Tensor:
        return ag_matmul(x, w, span.sizes, self.pg, self.backend, label, self.save_input, self.ring)

    def matmul_scatter(self, span: Span, h: torch.Tensor, w: torch.Tensor, label: str) -> torch.Tensor:
        return matmul_rs(h, w, span.sizes, self.pg, self.backend, label, self.save_input, self.ring)

    def positions(self, span: Span, position_ids, batch: int, device: torch.device) -> torch.Tensor:
        """The default needs no traffic; given (shard-layout) positions are all-gathered."""
        if position_ids is None:
            return torch.arange(span.total, device=device)[None]
        local = normalize_position_ids(position_ids, batch, span.sizes[self.rank], 0, device).expand(batch, -1)
        return comm.primitives.all_gather(
            local.contiguous(), span.sizes, self.pg, 1, category="metadata", label="positions"
        )
