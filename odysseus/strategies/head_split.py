"""Attention split by heads: one module for TP, TP-SP and Odysseus; the region is the only difference.

QKV is split by columns (this rank's query heads and the kv heads they read), O by rows. The region
(:mod:`.regions`) supplies the entry (identity, or all-gather⊗GEMM of the sequence shards) and the exit
(all-reduce, or GEMM⊗reduce-scatter). Odysseus' attention is TP-SP's: :data:`OdysseusAttention` is
:class:`TPSPAttention`. Biases: q/k/v's are split with their rows; o_proj's is added once, after the sum
over ranks.
"""

from __future__ import annotations

import torch

from ..layout import HeadSplit, rows
from ..ops.packing import check_window
from ..ops.rope import RopeFrequencies, rotate_qk
from ..validation import check_input
from .module import RegionModule
from .regions import ReplicatedRegion, SequenceRegion
from .ring_span import attend, longest_position, open_ring, sequence_positions


class HeadSplitAttention(RegionModule):
    """Attention with this rank's query heads (and the kv heads they read), o_proj split by rows.

    ``forward(x, position_ids=None) -> same layout as x``; ``x`` is ``(batch, seq, hidden)`` in a replicated
    region and ``(batch, seq_local, hidden)`` in a sequence region. ``position_ids`` follow ``x``'s layout and
    default to the true global positions; given ones that restart at 0 mark packed documents
    (:mod:`odysseus.ops.packing`), found from the positions of the whole sequence.
    """

    region_type = SequenceRegion

    def __init__(self, config, group=None, **kwargs):
        super().__init__(config, group, **kwargs)
        hd = config.head_dim
        self.heads = HeadSplit.build(config, self.world, self.rank)
        self.rope = RopeFrequencies.of(config)
        kv_sync = "sum" if self.heads.shared_kv else "none"
        self.add_linear("q_proj", 0, rows(self.heads.q, hd))
        self.add_linear("k_proj", 0, rows(self.heads.kv, hd), kv_sync)
        self.add_linear("v_proj", 0, rows(self.heads.kv, hd), kv_sync)
        o_bias_sync = "sum" if self.region.sequence_split and self.world > 1 else "none"
        self.add_linear("o_proj", 1, rows(self.heads.q, hd), row_bias_sync=o_bias_sync)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        span = self.region.open(
            x, position_ids, lambda: check_input(x, self.q_proj.weight, c.hidden_size, self.region.who)
        )
        ring = open_ring(self.mesh, span.total, type(self).__name__, span.prints)
        check_window(c.sliding_window, span.total if ring is None else ring.total, type(self).__name__)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        w_qkv = torch.cat([p.weight for p in projections]).t()
        qkv = span.gather_matmul(x, w_qkv, "attn.qkv")
        if c.qkv_bias:
            qkv = qkv + torch.cat([p.bias for p in projections])
        widths = [p.weight.shape[0] for p in projections]
        q, k, v = (t.unflatten(-1, (-1, c.head_dim)) for t in qkv.split(widths, -1))
        pos = sequence_positions(span, ring, position_ids, x.shape[0], x.device)
        longrope = ring is not None and self.rope.long_inv_freq is not None  # reads the whole sequence's positions
        longest = longest_position(ring, pos, position_ids is not None) if longrope else None
        q, k = rotate_qk(q, k, pos, self.rope, longest)
        o = attend(ring, q, k, v, self.heads.kv_of_q, c.causal, None if position_ids is None else pos)
        out = span.matmul_scatter(o.flatten(2), self.o_proj.weight.t(), "attn.out")
        # The bias of a row-split projection is added once, to the sum over ranks, not to each partial product.
        return out + self.o_proj.bias if c.o_bias else out


class TPAttention(HeadSplitAttention):
    """Megatron TP attention: the full sequence on every rank, an all-reduce after O."""

    region_type = ReplicatedRegion


class TPSPAttention(HeadSplitAttention):
    """TP attention between an all-gather (before QKV) and a reduce-scatter (after O) of the sequence."""

    region_type = SequenceRegion


OdysseusAttention = TPSPAttention
"""Odysseus' attention is TP-SP's: all-gather the shards, this rank's heads, O by rows, reduce-scatter."""
