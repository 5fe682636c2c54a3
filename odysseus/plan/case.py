"""What the planner evaluates: one rank's share of one block under one strategy (:class:`Case`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

from ..config import TransformerConfig
from ..layout import HeadSplit, shard_sizes, uniform_gqa
from ..strategies.registry import StrategySpec, Variant


@dataclass(frozen=True)
class RankShape:
    """The sizes one rank holds."""

    tokens: int
    """This rank's sequence shard L_r."""
    q_heads: int
    kv_heads: int
    uniform: bool
    """Local query heads read local kv heads in equal consecutive groups (no kv expansion)."""
    ffn_cols: int
    """This rank's FFN columns where the FFN is split."""


SAVE_INPUT = ("gathered", "shard")
"""What an all-gather⊗GEMM keeps for backward (``odysseus.overlap.ops``): the gathered input or this rank's shard."""


@dataclass(frozen=True)
class Case:
    """One rank of one block: the strategy (a :class:`Variant` or its name, ``"odysseus+zero3"``), the block's
    shape, ``batch`` sequences of ``seq`` tokens split over ``world`` ranks, ``dtype_bytes`` per element
    of activations and weights, and the overlap ops' options: ``save_input`` and the ring of slots every
    gather streams through in ``"shard"`` mode (``ring_tokens`` per piece, None: a quarter of the largest
    shard; ``ring_slots`` pieces in flight) and ``ffn_tile``, as ``odysseus.parallelize`` takes them.

    ``ring``: the ring degree R of a ``("ring", "sp")`` mesh (``odysseus.plan.ring``). Then ``seq`` is the tokens
    of one ring rank, ``L/R`` (its two chunks of ``L/(2R)``), ``world`` the ``sp`` size S and ``rank`` the rank
    in ``sp``: the head-parallel forms hold with ``L`` replaced by ``L/R`` and ``N`` by ``S``."""

    variant: Variant
    config: TransformerConfig
    batch: int
    seq: int
    world: int
    rank: int = 0
    dtype_bytes: int = 2
    save_input: str = "gathered"
    ring_tokens: int | None = None
    ring_slots: int = 2
    ffn_tile: int | None = None
    """Tokens per rank of one FFN tile (``parallelize(ffn_tile=)``); None: the FFN runs untiled."""
    ring: int = 1
    """Ring ranks the sequence is also cut over (1: no ring)."""

    def __post_init__(self) -> None:
        if isinstance(self.variant, str):
            object.__setattr__(self, "variant", Variant.parse(self.variant))
        if self.save_input not in SAVE_INPUT:
            raise ValueError(f"unknown save_input {self.save_input!r}; expected one of {SAVE_INPUT}")
        if self.ring_slots < 1 or (self.ring_tokens is not None and self.ring_tokens < 1):
            raise ValueError(f"ring_tokens={self.ring_tokens}, ring_slots={self.ring_slots}: both must be >= 1")
        if not isinstance(self.ring, int) or isinstance(self.ring, bool) or self.ring < 1:
            raise ValueError(f"ring={self.ring!r} must be a positive int")
        if self.ring > 1 and self.seq % 2:
            raise ValueError(f"ring={self.ring}: seq={self.seq} (one ring rank's tokens) must be two equal chunks")
        if self.ffn_tile is not None and self.ffn_tile < 1:
            raise ValueError(f"ffn_tile={self.ffn_tile!r} must be a positive number of tokens (or None)")

    @property
    def keeps_shard(self) -> bool:
        """The all-gather⊗GEMMs keep only this rank's shard (``save_input="shard"`` on a strategy that runs them)."""
        return self.save_input == "shard" and self.spec.overlapped

    def piece_tokens(self) -> int:
        """Tokens per piece of a streamed gather (``odysseus.overlap.stream.Ring.piece_tokens``)."""
        return self.ring_tokens or max(1, -(-max(shard_sizes(self.seq, self.world)) // 4))

    @property
    def spec(self) -> StrategySpec:
        """The strategy's spec (ZeRO-3 or not): what the closed forms and the time model read."""
        return self.variant.spec

    def at(self, rank: int) -> Case:
        """The same case on another rank."""
        return dataclasses.replace(self, rank=rank)

    @cached_property
    def shape(self) -> RankShape:
        """This rank's tokens, heads and FFN columns (heads split by the :mod:`odysseus.layout` rule)."""
        c = self.config
        heads = HeadSplit.build(c, self.world, self.rank)
        (qs, qe), (ks, ke) = heads.q[self.rank], heads.kv[self.rank]
        q, kv = qe - qs, ke - ks
        uniform = uniform_gqa(list(heads.kv_of_q), kv)
        return RankShape(
            tokens=shard_sizes(self.seq, self.world)[self.rank],
            q_heads=q,
            kv_heads=kv,
            uniform=uniform,
            ffn_cols=shard_sizes(c.intermediate_size, self.world)[self.rank],
        )


def heads_feasible(config: TransformerConfig, world: int) -> str | None:
    """Why ``world`` ranks of ``sp`` cannot split this block's heads (every strategy needs one query head per rank),
    or None. A ring dim multiplies the ranks past the heads (``odysseus.plan.ring``)."""
    if world > config.num_heads:
        return (
            f"N={world} > {config.num_heads} query heads (every strategy splits heads over sp; a ring goes past them)"
        )
    return None
