"""TP with sequence parallelism: activations stay split along the sequence between the layers.

An all-gather feeds each column-split GEMM and a reduce-scatter follows each row-split one; both go
through :mod:`odysseus.overlap`, which can hide them behind the GEMMs. Input and output:
``(batch, seq_local, hidden)`` shards from :func:`odysseus.shard_sequence`.
"""

from __future__ import annotations

from .tp import TPFFN, TPAttention


class TPSPAttention(TPAttention):
    """TP attention between an all-gather (before QKV) and a reduce-scatter (after O) of the sequence.

    ``forward(x: (batch, seq_local, hidden), position_ids=None) -> (batch, seq_local, hidden)``;
    ``position_ids``, if given, are this shard's ``(batch or 1, seq_local)``; by default the true global
    positions.
    """

    strategy = "tp-sp"
    sequence_parallel = True


class TPSPFFN(TPFFN):
    """TP FFN between an all-gather and a reduce-scatter of the sequence.

    ``forward(x: (batch, seq_local, hidden)) -> (batch, seq_local, hidden)``.
    """

    strategy = "tp-sp"
    sequence_parallel = True
