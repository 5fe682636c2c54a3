"""The FFNs: SwiGLU split by columns and rows inside a region (TP, TP-SP), or whole on this rank's tokens.

:class:`ColumnRowFFN` splits gate/up by columns and down by rows over the intermediate dim; its region
supplies the entry and exit collectives, as for the head-split attention (gate/up biases split with their
columns, down's added once after the sum). :class:`SeqParallelFFN` runs
this rank's tokens through whole weights (Odysseus, Ulysses): it moves no activations, and its weight
gradients are partial sums over this rank's tokens until :func:`odysseus.finalize_grads` sums them (or
FSDP2 reduce-scatters them, ``odysseus.zero3``).

``ffn_tile`` (tokens per rank): both run the sequence tile by tile, each tile recomputed in backward, so the
``(tokens, intermediate)`` tensors exist one tile at a time (the FFN is token-wise: any split of the tokens
gives the same result). Under TP-SP every rank cuts its shard into the same number of pieces, and a tile
gathers the pieces of one index, so the tiles' collectives run in step.
"""

from __future__ import annotations

import functools

import torch

from ..layout import split_ranges
from ..ops.recompute import recompute
from ..ops.swiglu import swiglu
from ..profiling import ody_range
from ..validation import check_finite_here, check_input
from .module import ParallelModule, RegionModule
from .regions import ReplicatedRegion, SequenceRegion, Span


class ColumnRowFFN(RegionModule):
    """SwiGLU with gate/up split by columns and down by rows; ``forward(x) -> same layout as x``."""

    region_type = SequenceRegion

    def __init__(self, config, group=None, **kwargs):
        super().__init__(config, group, **kwargs)
        cols = split_ranges(config.intermediate_size, self.world, "intermediate_size")
        self.add_linear("gate_proj", 0, cols)
        self.add_linear("up_proj", 0, cols)
        down_bias_sync = "sum" if self.region.sequence_split and self.world > 1 else "none"
        self.add_linear("down_proj", 1, cols, row_bias_sync=down_bias_sync)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The length exchange is a graph break under torch.compile: keep it outside the profiler range,
        # which dynamo cannot resume inside. It runs the input check too, so a failure raises on every rank.
        span = self.region.open(
            x, None, lambda: check_input(x, self.gate_proj.weight, self.config.hidden_size, self.region.who)
        )
        with ody_range("ody/ffn"):
            if self.ffn_tile is None:
                return self._ffn(span, x)
            # Tile by tile, each recomputed in backward: the intermediate exists for one tile at a time.
            tiles = span.tiles(self.ffn_tile)
            return torch.cat([recompute(functools.partial(self._ffn, sub), x[:, a:b]) for sub, a, b in tiles], 1)

    def _ffn(self, span: Span, x: torch.Tensor) -> torch.Tensor:
        w_gu = torch.cat([self.gate_proj.weight, self.up_proj.weight]).t()
        gate_up = span.gather_matmul(x, w_gu, "ffn.up")
        if self.config.mlp_bias:
            gate_up = gate_up + torch.cat([self.gate_proj.bias, self.up_proj.bias])
        gate, up = gate_up.chunk(2, dim=-1)
        out = span.matmul_scatter(swiglu(gate, up), self.down_proj.weight.t(), "ffn.down")
        # down_proj's bias is added once, to the sum over ranks.
        return out + self.down_proj.bias if self.config.mlp_bias else out


class TPFFN(ColumnRowFFN):
    """Megatron TP FFN: ``(batch, seq, hidden)`` on every rank, an all-reduce after down."""

    region_type = ReplicatedRegion


class TPSPFFN(ColumnRowFFN):
    """TP FFN between an all-gather and a reduce-scatter of the sequence: ``(batch, seq_local, hidden)``."""

    region_type = SequenceRegion


class SeqParallelFFN(ParallelModule):
    """SwiGLU with whole (replicated) weights on this rank's tokens; no activation traffic.

    ``forward(x: (batch, seq_local, hidden)) -> (batch, seq_local, hidden)``.
    """

    sequence_split = True

    def __init__(self, config, group=None, **kwargs):
        super().__init__(config, group, **kwargs)
        sync = "sum" if self.world > 1 else "none"
        for name in ("gate_proj", "up_proj", "down_proj"):
            self.add_linear(name, sync=sync)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.gate_proj.weight, self.config.hidden_size, type(self).__name__)
        if self.check_finite:
            check_finite_here(x, type(self).__name__, self.rank)
        with ody_range("ody/ffn"):
            if self.ffn_tile is None:
                return self._ffn(x)
            # Tile by tile, each recomputed in backward: the intermediate exists for one tile at a time.
            tile = self.ffn_tile
            return torch.cat([recompute(self._ffn, x[:, t : t + tile]) for t in range(0, x.shape[1], tile)], 1)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
