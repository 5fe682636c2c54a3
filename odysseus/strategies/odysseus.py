"""Odysseus: TP-SP attention, and an FFN that is purely sequence-parallel.

The FFN runs this rank's tokens through whole weights, so it moves no activations; only its weight
gradients are summed over ranks (``finalize_grads``), or reduce-scattered by FSDP2 (``odysseus.zero3``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..profiling import ody_range
from ..validation import check_input
from .common import ParallelModule
from .tp_sp import TPSPAttention


class OdysseusAttention(TPSPAttention):
    """All-gather the sequence shards, QKV for this rank's heads, attention, O by rows, reduce-scatter.

    ``forward(x: (batch, seq_local, hidden), position_ids=None) -> (batch, seq_local, hidden)``.
    """

    strategy = "odysseus"


class SeqParallelFFN(ParallelModule):
    """SwiGLU with whole (replicated) weights on this rank's tokens; no activation traffic.

    ``forward(x: (batch, seq_local, hidden)) -> (batch, seq_local, hidden)``. The weight gradients are
    partial sums over this rank's tokens until :func:`odysseus.finalize_grads` all-reduces them.
    """

    strategy = "odysseus"

    def __init__(self, config, group=None, **kwargs):
        super().__init__(config, group, **kwargs)
        sync = "sum" if self.world > 1 else "none"
        for name in ("gate_proj", "up_proj", "down_proj"):
            self.add_linear(name, sync=sync)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.gate_proj.weight, self.config.hidden_size, type(self).__name__)
        self.check_finite_input(x)
        with ody_range("ody/ffn"):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
