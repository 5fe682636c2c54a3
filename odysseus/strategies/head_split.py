"""Attention split by heads: one module for TP, TP-SP and Odysseus; the region is the only difference.

QKV is split by columns (this rank's query heads and the kv heads they read), O by rows. The region
(:mod:`.regions`) supplies the entry (identity, or all-gather⊗GEMM of the sequence shards) and the exit
(all-reduce, or GEMM⊗reduce-scatter). Odysseus' attention is TP-SP's: :data:`OdysseusAttention` is
:class:`TPSPAttention`.
"""

from __future__ import annotations

import torch

from ..attention import local_attention
from ..layout import HeadSplit, rows
from ..rope import rotate_qk
from ..validation import check_input
from .module import ParallelModule
from .regions import ReplicatedRegion, SequenceRegion


class HeadSplitAttention(ParallelModule):
    """Attention with this rank's query heads (and the kv heads they read), o_proj split by rows.

    ``forward(x, position_ids=None) -> same layout as x``; ``x`` is ``(batch, seq, hidden)`` in a replicated
    region and ``(batch, seq_local, hidden)`` in a sequence region. ``position_ids`` follow ``x``'s layout and
    default to the true global positions.
    """

    region_type: type = SequenceRegion

    def __init__(self, config, group=None, **kwargs):
        super().__init__(config, group, **kwargs)
        hd = config.head_dim
        self.region = self.region_type(
            self.pg, self.rank, self.backend, type(self).__name__, self.check_finite, self.check_inputs
        )
        self.heads = HeadSplit.build(config, self.world, self.rank)
        kv_sync = "sum" if self.heads.shared_kv else "none"
        self.add_linear("q_proj", 0, rows(self.heads.q, hd))
        self.add_linear("k_proj", 0, rows(self.heads.kv, hd), kv_sync)
        self.add_linear("v_proj", 0, rows(self.heads.kv, hd), kv_sync)
        self.add_linear("o_proj", 1, rows(self.heads.q, hd))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        check_input(x, self.q_proj.weight, c.hidden_size, type(self).__name__)
        span = self.region.open(x, position_ids)
        w_qkv = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]).t()
        qkv = span.gather_matmul(x, w_qkv, "attn.qkv")
        widths = [w.shape[0] for w in (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)]
        q, k, v = (t.unflatten(-1, (-1, c.head_dim)) for t in qkv.split(widths, -1))
        q, k = rotate_qk(q, k, span.positions(position_ids, x.shape[0], x.device), c.head_dim, c.rope_theta)
        o = local_attention(q, k, v, list(self.heads.kv_of_q), c.causal)
        return span.matmul_scatter(o.flatten(2), self.o_proj.weight.t(), "attn.out")

    def extra_repr(self) -> str:
        return f"{self.region!r}, {super().extra_repr()}"


class TPAttention(HeadSplitAttention):
    """Megatron TP attention: the full sequence on every rank, an all-reduce after O."""

    region_type = ReplicatedRegion


class TPSPAttention(HeadSplitAttention):
    """TP attention between an all-gather (before QKV) and a reduce-scatter (after O) of the sequence."""

    region_type = SequenceRegion


OdysseusAttention = TPSPAttention
"""Odysseus' attention is TP-SP's: all-gather the shards, this rank's heads, O by rows, reduce-scatter."""
