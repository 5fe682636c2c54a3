"""Megatron tensor parallelism: heads and FFN columns split over ranks; every rank sees the full sequence.

Forward: identity into the column-split GEMMs, all-reduce after the row-split ones (2 per block).
TP-SP (:mod:`.tp_sp`) reuses these classes with sequence-split entry and exit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import comm
from ..attention import local_attention
from ..overlap import ag_matmul, matmul_rs
from ..profiling import ody_range
from ..rope import apply_rope, rope_cos_sin
from ..validation import check_input, normalize_position_ids
from .common import HeadSplit, ParallelModule, rows, split_ranges


class TPAttention(ParallelModule):
    """Attention with this rank's query heads (and the kv heads they read), o_proj split by rows.

    ``forward(x: (batch, seq, hidden), position_ids=None) -> (batch, seq, hidden)``, full sequence on
    every rank; ``position_ids`` default to ``0..seq-1``.
    """

    strategy = "tp"
    sequence_parallel = False

    def __init__(self, config, group=None, **kwargs):
        super().__init__(config, group, **kwargs)
        hd = config.head_dim
        self.heads = HeadSplit.build(config, self.world, self.rank)
        kv_sync = "sum" if self.heads.shared_kv else "none"
        self.add_linear("q_proj", 0, rows(self.heads.q, hd))
        self.add_linear("k_proj", 0, rows(self.heads.kv, hd), kv_sync)
        self.add_linear("v_proj", 0, rows(self.heads.kv, hd), kv_sync)
        self.add_linear("o_proj", 1, rows(self.heads.q, hd))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        c, who = self.config, type(self).__name__
        check_input(x, self.q_proj.weight, c.hidden_size, who)
        B = x.shape[0]
        w_qkv = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]).t()
        if self.sequence_parallel:
            sizes = self.seq_lengths(x)
            qkv = ag_matmul(x, w_qkv, sizes, self.pg, self.backend, "attn.qkv")
            pos = self._gathered_positions(position_ids, B, sizes, x.device)
        else:
            self.check_finite_input(x)
            qkv = comm.copy_to_tp(x, self.pg, "attn.qkv") @ w_qkv
            pos = normalize_position_ids(position_ids, B, x.shape[1], 0, x.device)
        nq, nkv = len(self.heads.kv_of_q), self.k_proj.weight.shape[0] // c.head_dim
        q, k, v = (
            t.unflatten(-1, (-1, c.head_dim))
            for t in qkv.split([nq * c.head_dim, nkv * c.head_dim, nkv * c.head_dim], -1)
        )
        cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta, x.dtype)
        o = local_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, list(self.heads.kv_of_q), c.causal)
        o, w_o = o.flatten(2), self.o_proj.weight.t()
        if self.sequence_parallel:
            return matmul_rs(o, w_o, sizes, self.pg, self.backend, "attn.out")
        return comm.reduce_from_tp(o @ w_o, self.pg, "attn.out")

    def _gathered_positions(self, position_ids, batch, sizes, device):
        """Positions of the whole sequence: the default needs no traffic, given ones are all-gathered."""
        if position_ids is None:
            return torch.arange(sum(sizes), device=device)[None]
        local = normalize_position_ids(position_ids, batch, sizes[self.rank], 0, device).expand(batch, -1)
        return comm.primitives.all_gather(local.contiguous(), sizes, self.pg, 1, category="metadata", label="positions")


class TPFFN(ParallelModule):
    """SwiGLU with gate/up split by columns and down by rows over the intermediate dim.

    ``forward(x: (batch, seq, hidden)) -> (batch, seq, hidden)``, full sequence on every rank.
    """

    strategy = "tp"
    sequence_parallel = False

    def __init__(self, config, group=None, **kwargs):
        super().__init__(config, group, **kwargs)
        cols = split_ranges(config.intermediate_size, self.world, "intermediate_size")
        self.add_linear("gate_proj", 0, cols)
        self.add_linear("up_proj", 0, cols)
        self.add_linear("down_proj", 1, cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.gate_proj.weight, self.config.hidden_size, type(self).__name__)
        # The length exchange is a graph break under torch.compile: keep it outside the profiler range,
        # which dynamo cannot resume inside.
        if self.sequence_parallel:
            sizes = self.seq_lengths(x)
        else:
            self.check_finite_input(x)
        with ody_range("ody/ffn"):
            w_gu = torch.cat([self.gate_proj.weight, self.up_proj.weight]).t()
            if self.sequence_parallel:
                gu = ag_matmul(x, w_gu, sizes, self.pg, self.backend, "ffn.up")
            else:
                gu = comm.copy_to_tp(x, self.pg, "ffn.up") @ w_gu
            gate, up = gu.chunk(2, dim=-1)
            h, w_d = F.silu(gate) * up, self.down_proj.weight.t()
            if self.sequence_parallel:
                return matmul_rs(h, w_d, sizes, self.pg, self.backend, "ffn.down")
            return comm.reduce_from_tp(h @ w_d, self.pg, "ffn.down")
