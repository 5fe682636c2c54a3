"""DeepSpeed-Ulysses: whole weights, sequence split; all-to-all into head-split layout for attention.

q/k/v are computed on this rank's tokens, rotated at their global positions, then moved by all-to-all to
(all tokens, this rank's heads); the attention output goes back the same way. Uneven heads and shards use
all-to-all split sizes; with GQA each rank receives exactly the kv heads its query heads read, so a kv head
may travel to several ranks and its gradient comes back summed. RoPE and the local attention are the ones
the head-split attention uses.
"""

from __future__ import annotations

import torch

from .. import comm
from ..layout import HeadSplit
from ..ops.packing import check_window
from ..ops.rope import RopeFrequencies, rotate_qk
from ..validation import check_input
from .module import RegionModule
from .regions import SequenceRegion
from .ring_span import attend, longest_position, open_ring, sequence_positions


class UlyssesAttention(RegionModule):
    """``forward(x: (batch, seq_local, hidden), position_ids=None) -> (batch, seq_local, hidden)``.

    ``position_ids``, if given, are this shard's ``(batch or 1, seq_local)``; by default the true global
    positions of the shard. Given ones are all-gathered: attention runs on the whole sequence, so packed
    documents (positions restarting at 0) are found from the positions of all shards.
    """

    region_type = SequenceRegion

    def __init__(self, config, group=None, **kwargs):
        super().__init__(config, group, **kwargs)
        self.heads = HeadSplit.build(config, self.world, self.rank)
        self.rope = RopeFrequencies.of(config)
        sync = "sum" if self.world > 1 else "none"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            self.add_linear(name, sync=sync)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        span = self.region.open(
            x, position_ids, lambda: check_input(x, self.q_proj.weight, c.hidden_size, self.region.who)
        )
        B, L_r, _ = x.shape
        ring = open_ring(self.mesh, span.total, type(self).__name__, span.prints)
        check_window(c.sliding_window, span.total if ring is None else ring.total, type(self).__name__)
        every = sequence_positions(span, ring, position_ids, B, x.device)  # (B or 1, L): the sp group's tokens
        pos = every[:, span.offset : span.offset + L_r]
        given = position_ids is not None
        # longrope reads the whole sequence
        longest = longest_position(ring, every, given) if self.rope.long_inv_freq is not None else None
        q = self.q_proj(x).unflatten(-1, (c.num_heads, c.head_dim))
        k = self.k_proj(x).unflatten(-1, (c.num_kv_heads, c.head_dim))
        q, k = rotate_qk(q, k, pos, self.rope, longest)
        v = self.v_proj(x).unflatten(-1, (c.num_kv_heads, c.head_dim))
        q = comm.seq_to_heads(q, span.sizes, self.heads.q, self.pg, "attn.q")
        k = comm.seq_to_heads(k, span.sizes, self.heads.kv, self.pg, "attn.k")
        v = comm.seq_to_heads(v, span.sizes, self.heads.kv, self.pg, "attn.v")
        o = attend(ring, q, k, v, self.heads.kv_of_q, c.causal, every if given else None)
        o = comm.heads_to_seq(o, span.sizes, self.heads.q, c.num_heads, self.pg, "attn.o")
        return self.o_proj(o.flatten(2))
