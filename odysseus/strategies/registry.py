"""The strategies: one :class:`StrategySpec` each, and the only list of them.

Everything that depends on the strategy (the modules a block is built from, which activations are split,
which weights every rank holds whole, whether ZeRO-3 applies, how many length exchanges a forward makes)
is read from a spec here; nothing else in the library compares strategy names. The planner adds the ZeRO-3
variants (:class:`Variant`), parsed here too.

Module classes are named by import path and loaded on demand, so the planner can read the registry
without importing ``torch.nn`` code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

ATTENTION_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_WEIGHTS = ("gate_proj", "up_proj", "down_proj")

# How a module moves activations (StrategySpec.attention_comm / ffn_comm).
ALL_REDUCE = "all_reduce"
"""TP: all-reduce after the row-split GEMM."""
GATHER_SCATTER = "gather_scatter"
"""All-gather before the column-split GEMM, reduce-scatter after the row-split one (the overlap ops)."""
ALL_TO_ALL = "all_to_all"
"""Sequence-split to head-split and back (Ulysses)."""
NO_TRAFFIC = "none"
"""This rank's tokens through whole weights."""


@dataclass(frozen=True)
class StrategySpec:
    """What one strategy is made of."""

    name: str
    """The name users pass: ``parallelize(block, name)``."""
    attention: str
    """The attention module, as ``module:Class`` under ``odysseus.strategies``."""
    ffn: str
    """The FFN module, as ``module:Class`` under ``odysseus.strategies``."""
    sequence_split: bool
    """Activations between layers are split along the sequence (inputs are ``shard_sequence`` shards), so
    the norms see only this rank's tokens and their gradients are summed over ranks."""
    replicated: tuple[str, ...]
    """Dense linear weights every rank holds whole (their gradients are partial: summed, or sharded by
    ZeRO-3)."""
    attention_comm: str
    """How attention moves activations: ``all_reduce`` (TP), ``gather_scatter`` (all-gather before QKV,
    reduce-scatter after O), ``all_to_all`` (sequence <-> heads)."""
    ffn_comm: str
    """How the FFN moves activations: ``all_reduce``, ``gather_scatter`` or ``none`` (own tokens, whole
    weights)."""
    length_exchanges: int
    """Host-side exchanges of the sequence lengths per block forward (one per module that checks its layout;
    TP checks that every rank holds the whole sequence)."""

    @property
    def overlapped(self) -> bool:
        """Some module of the strategy runs the overlap ops (all-gather⊗GEMM, GEMM⊗reduce-scatter), so the
        overlap backend matters."""
        return GATHER_SCATTER in (self.attention_comm, self.ffn_comm)

    @property
    def zero3(self) -> bool:
        """ZeRO-3 (FSDP2 over the replicated weights) is offered: there are whole weights to shard."""
        return bool(self.replicated)

    def modules(self) -> tuple[type, type]:
        """(attention class, FFN class)."""
        return _load(self.attention), _load(self.ffn)


def _load(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(f"odysseus.strategies.{module}"), name)


SPECS: tuple[StrategySpec, ...] = (
    StrategySpec(
        name="tp", attention="head_split:TPAttention", ffn="ffn:TPFFN", sequence_split=False, replicated=(),
        attention_comm=ALL_REDUCE, ffn_comm=ALL_REDUCE, length_exchanges=2,
    ),
    StrategySpec(
        name="tp-sp", attention="head_split:TPSPAttention", ffn="ffn:TPSPFFN", sequence_split=True, replicated=(),
        attention_comm=GATHER_SCATTER, ffn_comm=GATHER_SCATTER, length_exchanges=2,
    ),
    StrategySpec(
        name="ulysses", attention="ulysses:UlyssesAttention", ffn="ffn:SeqParallelFFN", sequence_split=True,
        replicated=ATTENTION_WEIGHTS + FFN_WEIGHTS, attention_comm=ALL_TO_ALL, ffn_comm=NO_TRAFFIC, length_exchanges=1,
    ),
    StrategySpec(
        name="odysseus", attention="head_split:OdysseusAttention", ffn="ffn:SeqParallelFFN", sequence_split=True,
        replicated=FFN_WEIGHTS, attention_comm=GATHER_SCATTER, ffn_comm=NO_TRAFFIC, length_exchanges=1,
    ),
)  # fmt: skip
_BY_NAME = {s.name: s for s in SPECS}
STRATEGIES: tuple[str, ...] = tuple(_BY_NAME)


def get(name: str) -> StrategySpec:
    """The spec of strategy ``name``; ``ValueError`` naming the choices for an unknown one."""
    spec = _BY_NAME.get(name)
    if spec is None:
        raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")
    return spec


@dataclass(frozen=True)
class Variant:
    """A strategy as the planner ranks it: the spec, with or without ZeRO-3 (``"odysseus+zero3"``)."""

    spec: StrategySpec
    zero3: bool = False

    @property
    def name(self) -> str:
        return self.spec.name + ("+zero3" if self.zero3 else "")

    @classmethod
    def parse(cls, name: str) -> Variant:
        """``"odysseus"`` or ``"odysseus+zero3"``; ``ValueError`` naming the choices otherwise."""
        base, plus, extra = name.partition("+")
        if plus and extra != "zero3":
            raise ValueError(f"unknown strategy {name!r}; expected one of {tuple(v.name for v in VARIANTS)}")
        spec = get(base)
        if plus and not spec.zero3:
            raise ValueError(f"{name!r}: {base} holds no whole weights for ZeRO-3 to shard")
        return cls(spec, bool(plus))


# ZeRO-3 is planned for the strategies whose whole weights are a large share of the block.
VARIANTS: tuple[Variant, ...] = tuple(Variant(s) for s in SPECS) + tuple(
    Variant(s, True) for s in SPECS if set(FFN_WEIGHTS) <= set(s.replicated)
)
