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


@dataclass(frozen=True)
class Case:
    """One rank of one block: the strategy (a :class:`Variant` or its name, ``"odysseus+zero3"``), the block's
    shape, ``batch`` sequences of ``seq`` tokens split over ``world`` ranks, and ``dtype_bytes`` per element
    of activations and weights."""

    variant: Variant
    config: TransformerConfig
    batch: int
    seq: int
    world: int
    rank: int = 0
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.variant, str):
            object.__setattr__(self, "variant", Variant.parse(self.variant))

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
    """Why ``world`` ranks cannot split this block's heads (every strategy needs one query head per rank), or None."""
    if world > config.num_heads:
        return f"N={world} > {config.num_heads} query heads (every strategy splits heads)"
    return None
