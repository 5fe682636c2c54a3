"""The time model: seconds of one block, and of one training step of a whole model, on one rank.

- **Compute**: GEMM flops of this rank's share of every projection and causal-attention flops of its
  heads, forward + backward (2x the forward for GEMMs, 2.5x for attention: FlashAttention's backward has
  five GEMMs to the forward's two), against the dense bf16 peak times an achievable-efficiency factor.
- **Communication**: the bytes of :func:`~odysseus.plan.forms.strategy_records` against the link bandwidth,
  plus a fixed latency per collective. All-gathers/reduce-scatters fused with a GEMM (the ``odysseus.overlap``
  ops) hide a backend-dependent fraction behind it; all-reduces and all-to-alls of activations hide
  nothing; weight gathers and gradient syncs hide behind the compute of their phase by a configurable
  fraction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..strategies.registry import GATHER_SCATTER
from .case import Case
from .data_parallel import dp_step_records
from .efficiency import attention_efficiency
from .forms import expected_collectives, ffn_split, heads_split, zero3_records
from .presets import Assumptions, Hardware, Model
from .ring import attention_steps, crosses_nodes, hop_bytes, ring_exposed, ring_grad_records, zero3_view

PHASES = ("forward", "backward")

# The parts whose collectives run inside an all-gather⊗GEMM or a GEMM⊗reduce-scatter op can hide behind it.
_FUSED = GATHER_SCATTER


@dataclass
class Cost:
    """Time (seconds) and bytes of one rank, for one block or a whole model step."""

    compute_s: float = 0.0
    exposed_comm_s: float = 0.0
    """Communication (and collective latency) not hidden behind compute."""
    link_s: float = 0.0
    """Time the link is busy: a floor on the step however much overlaps."""
    comm_bytes: float = 0.0
    collectives: float = 0.0
    flops: float = 0.0

    @property
    def time_s(self) -> float:
        return max(self.compute_s + self.exposed_comm_s, self.link_s)

    def __add__(self, o: Cost) -> Cost:
        return Cost(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(o))))

    def __mul__(self, k: float) -> Cost:
        return Cost(*(a * k for a in dataclasses.astuple(self)))


@dataclass(frozen=True)
class _Gemm:
    name: str
    flops: float
    """Forward flops; the backward does twice as many."""
    fused: bool = False
    """Fused with an all-gather (forward) / reduce-scatter (its dgrad) or the reverse, in one overlap op."""


def _gemms(case: Case) -> list[_Gemm]:
    c, B, L, s = case.config, case.batch, case.seq, case.shape
    d, hd, i = c.hidden_size, c.head_dim, c.intermediate_size
    if heads_split(case):  # this rank's heads, every token
        fused = case.spec.attention_comm == _FUSED
        qkv, out = 2 * B * L * d * (s.q_heads + 2 * s.kv_heads) * hd, 2 * B * L * s.q_heads * hd * d
    else:  # every head, this rank's tokens
        fused = False
        qkv = 2 * B * s.tokens * d * (c.num_heads + 2 * c.num_kv_heads) * hd
        out = 2 * B * s.tokens * c.num_heads * hd * d
    gemms = [_Gemm("attn.qkv", qkv, fused), _Gemm("attn.out", out, fused)]
    if ffn_split(case):  # this rank's columns, every token
        tokens, cols, fused = L, s.ffn_cols, case.spec.ffn_comm == _FUSED
    else:  # every column, this rank's tokens
        tokens, cols, fused = s.tokens, i, False
    return gemms + [
        _Gemm("ffn.up", 2 * B * tokens * d * 2 * cols, fused),
        _Gemm("ffn.down", 2 * B * tokens * cols * d, fused),
    ]


def attention_flops(case: Case) -> float:
    """Forward flops of causal attention over this rank's query heads: QK^T and PV over half the L x L scores.
    With a ring of R, R steps of ``L/R`` query tokens against ``L/R`` key tokens, each half a block's pairs with
    the head/tail layout (:func:`~odysseus.plan.ring.step_pairs`)."""
    per_head = 4 * case.seq * case.seq * case.config.head_dim
    return case.ring * case.batch * case.shape.q_heads * (per_head / 2 if case.config.causal else per_head)


def comm_time(
    nbytes: float, op: str, world: int, hw: Hardware, a: Assumptions, across_nodes: bool | None = None
) -> float:
    """Seconds for one rank to receive ``nbytes`` in collective ``op``, plus its fixed latency.

    Within a node every byte crosses the intra-node link. Across nodes a ring (all-gather, reduce-scatter,
    all-reduce) is as slow as its slowest hop, the NIC; an all-to-all sends each peer its own share, so
    only the share bound for other nodes crosses the NIC while the rest moves on the node's fabric.
    ``across_nodes``: whether the group spans nodes (default: ``world`` ranks more than one node holds; a
    data-parallel group of ``world`` ranks strided across nodes spans them however small).
    """
    eff = a.link_efficiency * a.collective_efficiency.get(op, 1.0)
    across = world > hw.gpus_per_node if across_nodes is None else across_nodes
    if not across or hw.inter_node_bw is None:
        t = nbytes / hw.intra_node_bw
    elif op == "all_to_all" and world > hw.gpus_per_node:
        remote = (world - hw.gpus_per_node) / (world - 1)
        t = max(nbytes * remote / hw.inter_node_bw, nbytes * (1 - remote) / hw.intra_node_bw)
    else:
        t = nbytes / min(hw.inter_node_bw, hw.intra_node_bw)
    # An all-reduce is a reduce-scatter then an all-gather (as the ledger counts it): two latencies.
    return t / eff + a.collective_latency_s * (2 if op == "all_reduce" else 1)


# A fused collective hides behind the GEMM of its label: forward, the all-gather feeds QKV/up and the
# reduce-scatter follows out/down; backward, the reduce-scatter follows QKV/up's input-gradient GEMM and the
# all-gather feeds out/down's; with save_input="shard" the re-gather of QKV/up's input feeds their
# weight-gradient GEMMs. Each of these GEMMs does the forward GEMM's flops.


def block_cost(
    case: Case, hw: Hardware, assumptions: Assumptions, backend: str = "naive", recompute: bool = False
) -> Cost:
    """One block's forward+backward (+ gradient sync) on ``case.rank``; see the module docstring for the terms.

    ``backend``: the ``odysseus.overlap`` backend, whose ``assumptions.overlap`` fraction of a fused
    collective hides; ``recompute``: the forward runs twice (full activation recomputation).
    """
    a = assumptions
    if backend not in a.overlap:
        raise ValueError(f"no overlap fraction for backend {backend!r}; assumptions know {sorted(a.overlap)}")
    gemm_rate = hw.peak_flops * a.gemm_efficiency
    gemms = _gemms(case)
    attn_f = attention_flops(case)
    gemm_f = sum(g.flops for g in gemms)
    if case.ring == 1:  # one causal kernel call over the sequence, at the published efficiency of its length
        eff = (attention_efficiency(hw, a, case.seq, case.config.head_dim, p, case.config.causal) for p in PHASES)
        attn_fwd, attn_bwd = (k * attn_f / (hw.peak_flops * e) for k, e in zip((1, 2.5), eff))
        steps_fwd, steps_bwd = [attn_fwd], [attn_bwd]
    else:  # R steps, each as slow as its slowest ring rank
        steps_fwd, steps_bwd, _ = attention_steps(case, hw, a)
        attn_fwd, attn_bwd = sum(steps_fwd), sum(steps_bwd)
    fwd = gemm_f / gemm_rate + attn_fwd
    bwd = 2 * gemm_f / gemm_rate + attn_bwd
    passes = 2 if recompute else 1  # recomputation reruns the forward, collectives included
    cost = Cost(compute_s=passes * fwd + bwd, flops=(passes + 2) * gemm_f + (passes + 2.5) * attn_f)
    if case.ring > 1:  # the ring's point-to-point hops, each hidden behind the attention of its step
        nbytes = hop_bytes(case)
        t = comm_time(nbytes, "p2p", case.ring, hw, a, across_nodes=crosses_nodes(case, hw))
        exposed, hops = ring_exposed(case.ring, t, a.ring_overlap, steps_fwd, steps_bwd, passes)
        cost += Cost(exposed_comm_s=exposed, link_s=hops * t, comm_bytes=hops * nbytes, collectives=hops)

    gemm_s = {g.name: g.flops / gemm_rate for g in gemms if g.fused}
    f = a.overlap[backend]
    budget = {"forward": passes * fwd, "backward": bwd}
    records = [(x.phase, x.op, x.category, x.bytes_received, x.label, case.world) for x in expected_collectives(case)]
    fsdp = zero3_view(case)  # ZeRO-3 shards over ring x sp
    records += [(*r, "", fsdp.world) for r in (zero3_records(fsdp) if case.variant.zero3 else [])]
    for phase, op, category, nbytes, label, group in records:
        t = comm_time(nbytes, op, group, hw, a)
        reps = passes if category == "activation" and phase == "forward" else 1
        cost.link_s += reps * t
        cost.comm_bytes += reps * nbytes
        cost.collectives += reps
        if category == "activation":
            # Unfused all-reduces and all-to-alls have no partner: they sit between dependent computations.
            exposed = t - f * min(t, gemm_s.get(label, 0.0))
        else:
            # Weight gathers and gradient syncs run in the background of the compute of their phase (FSDP2
            # prefetches the next block's gather under this one's forward and reduce-scatters during
            # backward; a bucketed all-reduce would too): they share that compute time between them.
            fraction = a.zero3_overlap if category == "weight" or op == "reduce_scatter" else a.grad_overlap
            hidden = min(fraction * t, budget[phase])
            budget[phase] -= hidden
            exposed = t - hidden
        cost.exposed_comm_s += reps * exposed
    # Lengths travel on the CPU side group: latency only, and not on the GPU link.
    exchanges = case.spec.length_exchanges
    cost.exposed_comm_s += passes * exchanges * a.host_exchange_latency_s if case.world > 1 else 0.0
    return cost


def whole_vocab(case: Case) -> bool:
    """Every rank holds the embedding and LM head whole: an assumption, for the strategies that hold whole
    block weights (the others split them by vocabulary; ZeRO-3 shards them)."""
    return bool(case.spec.replicated)


def model_step(
    model: Model, case: Case, hw: Hardware, a: Assumptions, backend: str, recompute: bool, dp: int = 1
) -> Cost:
    """The slowest rank's step: every block, plus the LM head's flops and the gradient sync of non-block
    weights, and with ``dp`` data-parallel replicas (each its own ``case.batch`` x ``case.seq`` tokens on
    ``case.world`` ranks) the gradient sum over them (:func:`dp_sync`). ``case.config`` is one block of
    ``model``; ``case.rank`` is ignored (every rank is evaluated)."""
    c, N, B, L = case.config, case.world, case.batch, case.seq
    per_rank = [block_cost(case.at(r), hw, a, backend, recompute) for r in range(N)]
    cost = max(per_rank, key=lambda x: x.time_s) * model.num_layers
    head_flops = 6 * B * L * c.hidden_size * model.vocab_size / N
    head = Cost(compute_s=head_flops / (hw.peak_flops * a.gemm_efficiency), flops=head_flops)
    zero3 = case.variant.zero3
    M = zero3_view(case).world if zero3 else N  # FSDP2 shards over ring x sp
    if M > 1 and whole_vocab(case):
        # Replicated embedding and LM head: their gradients are summed like the FFN's (or by FSDP2).
        n = (1 if model.tied_embeddings else 2) * model.vocab_size * c.hidden_size
        # Even chunks assumed: all-reduce 2(N-1)/N of them; FSDP2 all-gathers in forward and backward and
        # reduce-scatters, 3(M-1)/M.
        nbytes = (3 if zero3 else 2) * (M - 1) / M * n * case.dtype_bytes
        t = comm_time(nbytes, "all_reduce", M, hw, a)
        overlap = a.zero3_overlap if zero3 else a.grad_overlap
        head += Cost(exposed_comm_s=t - overlap * min(t, cost.compute_s), link_s=t, comm_bytes=nbytes, collectives=1)
    step = cost + head
    # Every ring rank holds the same weights for other tokens: their gradients are summed over the ring (what
    # FSDP2's reduce-scatters over ring x sp do not already sum), then over dp.
    rings = ring_grad_records(case.at(0), model.num_layers, model.vocab_size, model.tied_embeddings)
    ring_sync = _sync(rings, case.ring, hw, a, crosses_nodes(case, hw), step.compute_s)
    across = dp * case.ring * case.world > hw.gpus_per_node
    return step + ring_sync + dp_sync(model, case.at(0), hw, a, dp, step.compute_s, across)


def dp_sync(
    model: Model, case: Case, hw: Hardware, a: Assumptions, dp: int, compute_s: float, across: bool | None = None
) -> Cost:
    """The gradient traffic over ``dp`` replicas in one step (:func:`~odysseus.plan.data_parallel.dp_step_records`).

    Ranks are laid out dp-major, so the data-parallel group spans nodes as soon as the job does (its ranks
    are ``case.world`` apart). ``finalize_grads`` all-reduces after ``backward()`` (``grad_overlap`` of it
    hides behind the step's compute); FSDP2's all-reduces under hybrid ZeRO-3 run during backward
    (``zero3_overlap``). ``across``: whether the group spans nodes (default: the job does)."""
    across = dp * case.world > hw.gpus_per_node if across is None else across
    records = dp_step_records(case, dp, model.num_layers, model.vocab_size, model.tied_embeddings)
    return _sync(records, dp, hw, a, across, compute_s)


def _sync(
    records: list[tuple[str, int, int]], group: int, hw: Hardware, a: Assumptions, across: bool, compute_s: float
) -> Cost:
    """All-reduces of gradients over a group of ``group`` ranks, ``(who, bytes, collectives)`` each, hidden behind
    ``compute_s`` by ``grad_overlap`` (``finalize_grads``) or ``zero3_overlap`` (FSDP2)."""
    out = Cost()
    budget = compute_s
    for who, nbytes, count in records:
        t = comm_time(nbytes, "all_reduce", group, hw, a, across) + (count - 1) * 2 * a.collective_latency_s
        hidden = min((a.zero3_overlap if who == "fsdp" else a.grad_overlap) * t, budget)
        budget -= hidden
        out += Cost(exposed_comm_s=t - hidden, link_s=t, comm_bytes=nbytes, collectives=count)
    return out
