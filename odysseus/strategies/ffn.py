"""The FFNs: SwiGLU split by columns and rows inside a region (TP, TP-SP), or whole on this rank's tokens.

:class:`ColumnRowFFN` splits gate/up by columns and down by rows over the intermediate dim; its region
supplies the entry and exit collectives, as for the head-split attention. :class:`SeqParallelFFN` runs
this rank's tokens through whole weights (Odysseus, Ulysses): it moves no activations, and its weight
gradients are partial sums over this rank's tokens until :func:`odysseus.finalize_grads` sums them (or
FSDP2 reduce-scatters them, ``odysseus.zero3``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import split_ranges
from ..profiling import ody_range
from ..validation import check_finite_here, check_input
from .module import ParallelModule
from .regions import ReplicatedRegion, SequenceRegion


class ColumnRowFFN(ParallelModule):
    """SwiGLU with gate/up split by columns and down by rows; ``forward(x) -> same layout as x``."""

    region_type: type = SequenceRegion

    def __init__(self, config, group=None, **kwargs):
        super().__init__(config, group, **kwargs)
        self.region = self.region_type(
            self.pg, self.rank, self.backend, type(self).__name__, self.check_finite, self.check_inputs
        )
        cols = split_ranges(config.intermediate_size, self.world, "intermediate_size")
        self.add_linear("gate_proj", 0, cols)
        self.add_linear("up_proj", 0, cols)
        self.add_linear("down_proj", 1, cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.gate_proj.weight, self.config.hidden_size, type(self).__name__)
        # The length exchange is a graph break under torch.compile: keep it outside the profiler range,
        # which dynamo cannot resume inside.
        span = self.region.open(x)
        with ody_range("ody/ffn"):
            w_gu = torch.cat([self.gate_proj.weight, self.up_proj.weight]).t()
            gate, up = span.gather_matmul(x, w_gu, "ffn.up").chunk(2, dim=-1)
            return span.matmul_scatter(F.silu(gate) * up, self.down_proj.weight.t(), "ffn.down")

    def extra_repr(self) -> str:
        return f"{self.region!r}, {super().extra_repr()}"


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
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
