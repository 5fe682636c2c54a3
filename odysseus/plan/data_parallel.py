"""The data-parallel dim of a 2-D (dp, sp) mesh: the gradient traffic over ``dp``, in closed form, and its time.

On a mesh a block runs over ``sp`` exactly as over one group (:mod:`.forms` gives its collectives at world
``sp``). Over ``dp``, ``odysseus.finalize_grads`` all-reduces this rank's gradients once per step, in one
bucket (one dtype and device), after the ``sp`` sums:

- without ZeRO-3: every local parameter of the block (its heads or columns, whole weights, both norms);
- ZeRO-3 over ``sp`` alone (``shard="sp"``): the same, with each FSDP2-sharded weight's unpadded shard in
  place of the whole weight;
- ZeRO-3 ``hybrid`` or ``full``: only what FSDP2 leaves alone (the split weights); FSDP2 reduces the rest:
  hybrid all-reduces each sharded module's padded shard over ``dp`` after its reduce-scatter over ``sp``
  (:func:`fsdp_dp_records`); full runs its all-gathers and reduce-scatters over all ``dp x sp`` ranks.

Biases are not counted (as in :mod:`.forms`). ``tests/test_mesh.py`` checks :func:`dp_collectives` against
the CommLedger's ``dim="dp"`` records, and :mod:`.forms` against its ``dim="sp"`` ones, on 2-D meshes.
"""

from __future__ import annotations

from ..layout import all_reduce_bytes
from ..strategies.registry import ATTENTION_WEIGHTS, FFN_WEIGHTS
from .case import Case
from .forms import Collective, Record, _fsdp_local, _fsdp_units, dense_numel, ffn_split, heads_split

SHARDINGS = (None, "sp", "hybrid", "full")
"""No ZeRO-3, then ``odysseus.zero3``'s ``shard`` modes."""


def local_numel(case: Case) -> int:
    """Elements of one block's parameters on ``case.rank`` (of ``sp``), without ZeRO-3: this rank's query and kv
    heads (or every attention weight), its FFN columns (or the whole FFN) and the two norms."""
    c, s, dense = case.config, case.shape, dense_numel(case.config)
    d, hd = c.hidden_size, c.head_dim
    attn = (2 * s.q_heads + 2 * s.kv_heads) * hd * d if heads_split(case) else sum(dense[n] for n in ATTENTION_WEIGHTS)
    ffn = 3 * s.ffn_cols * d if ffn_split(case) else sum(dense[n] for n in FFN_WEIGHTS)
    return attn + ffn + 2 * d


def dp_grad_numel(case: Case, shard: str | None) -> int:
    """Elements ``finalize_grads`` all-reduces over ``dp`` for one block on ``case.rank`` (its rank in ``sp``),
    with ZeRO-3 ``shard`` mode (None: no ZeRO-3; see :data:`SHARDINGS`)."""
    if shard not in SHARDINGS:
        raise ValueError(f"shard={shard!r}; expected one of {SHARDINGS}")
    numel = local_numel(case)
    if shard is None:
        return numel
    units = _fsdp_units(case)
    numel -= sum(dim0 * rest for unit in units for dim0, rest in unit)  # whole weights FSDP2 takes over
    if shard == "sp":  # FSDP2 shards them over sp only: finalize_grads sums each unpadded shard over dp
        numel += sum(_fsdp_local(dim0, rest, case.world, case.rank)[1] for unit in units for dim0, rest in unit)
    return numel


def dp_collectives(case: Case, dp: int, dp_rank: int, shard: str | None = None) -> list[Collective]:
    """The library's collectives over ``dp`` for one block's step on the rank at ``(dp_rank, case.rank)``, as the
    CommLedger records them (``dim="dp"``, excluding metadata): one all-reduce of :func:`dp_grad_numel`."""
    numel = dp_grad_numel(case, shard)
    if dp == 1 or numel == 0:
        return []
    b = all_reduce_bytes(numel, dp, dp_rank, case.dtype_bytes)
    return [Collective("backward", "all_reduce", "gradient", "dp grads", b, b)]


def fsdp_dp_records(case: Case, dp: int, dp_rank: int) -> list[Record]:
    """FSDP2's own collectives over ``dp`` under hybrid sharding (HSDP), per block: one all-reduce of each sharded
    module's padded shard, after its reduce-scatter over ``sp`` (:func:`~odysseus.plan.forms.zero3_records`)."""
    if dp == 1 or case.world == 1:
        return []
    out: list[Record] = []
    for unit in _fsdp_units(case):
        numel = sum(_fsdp_local(dim0, rest, case.world, case.rank)[0] for dim0, rest in unit)
        out.append(("backward", "all_reduce", "gradient", all_reduce_bytes(numel, dp, dp_rank, case.dtype_bytes)))
    return out


def nonblock_numel(case: Case, vocab_size: int, tied: bool, sharded: bool) -> int:
    """Elements of the embedding (and LM head) and final norm on ``case.rank``, as the planner's memory model
    holds them: whole where the strategy holds whole block weights, split by vocabulary otherwise, and
    FSDP2-sharded (``sharded``) under ZeRO-3."""
    N, d, mats = case.world, case.config.hidden_size, 1 if tied else 2
    if sharded:
        return mats * -(-vocab_size // N) * d + -(-d // N)
    return mats * (vocab_size if case.spec.replicated else -(-vocab_size // N)) * d + d


def dp_step_records(case: Case, dp: int, num_layers: int, vocab_size: int, tied: bool) -> list[tuple[str, int, int]]:
    """What one training step moves over ``dp`` on ``case.rank`` (data-parallel rank 0), as ``(who, bytes
    received, collectives)``: ``"finalize_grads"`` (one all-reduce of every gradient the library sums) and, for
    a ZeRO-3 variant (planned as hybrid sharding), ``"fsdp"`` (FSDP2's all-reduce of each sharded module's
    shard, the embeddings' included)."""
    if dp == 1:
        return []
    e, zero3 = case.dtype_bytes, case.variant.zero3
    shard = "hybrid" if zero3 else None
    numel = num_layers * dp_grad_numel(case, shard) + (0 if zero3 else nonblock_numel(case, vocab_size, tied, False))
    out = [("finalize_grads", all_reduce_bytes(numel, dp, 0, e), 1)]
    if zero3:
        per_block = fsdp_dp_records(case, dp, 0)
        nonblock = all_reduce_bytes(nonblock_numel(case, vocab_size, tied, True), dp, 0, e)
        total = num_layers * sum(b for *_, b in per_block) + nonblock
        out.append(("fsdp", total, num_layers * len(per_block) + 1))
    return out
