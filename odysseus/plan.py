"""A cost model that predicts step time and peak memory per rank for each strategy, and picks one.

    python -m odysseus.plan --model llama2-7b --seq 65536 --gpus 8 --hardware h100-nvlink
    python -m odysseus.plan --calibrate bench.json          # fit rate and bandwidth to a bench_layer.py run

What it counts, per rank and per training step of one micro-batch (see docs/PLANNER.md):

- **Compute**: GEMM flops of this rank's share of every projection and causal-attention flops of its
  heads, forward + backward (2x the forward for GEMMs, 2.5x for attention: FlashAttention's backward has
  five GEMMs to the forward's two), against the dense bf16 peak times an achievable-efficiency factor.
- **Communication**: the bytes each rank receives, from the closed forms that ``tests/test_volume.py``
  checks against the CommLedger (:mod:`odysseus.volume`), plus FSDP2's all-gathers and reduce-scatters
  for the ZeRO-3 variants (:func:`zero3_records`, checked by ``perf/comm_volume.py``), against the link
  bandwidth, plus a fixed latency per collective. TP-SP and Odysseus all-gathers/reduce-scatters hide a
  backend-dependent fraction behind the GEMM they are fused with; Ulysses' all-to-all and TP's all-reduce
  hide nothing; gradient syncs hide behind backward compute by a configurable fraction.
- **Memory**: parameters, gradients and optimizer states of this rank, activations saved for backward
  (:func:`saved_activation_bytes`, checked against ``SavedActivations`` by ``perf/memory.py``), the
  logits, and FSDP2's gathered buffers. Where activations do not fit, full activation recomputation
  (one more forward) is tried.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .attention import uniform_gqa
from .comm.sizes import shard_sizes
from .config import TransformerConfig
from .layout import HeadSplit, dense_shapes
from .plan_presets import HARDWARE, MODELS, Assumptions, Hardware, Model, get_hardware, get_model
from .volume import Record, expected_records

BASE_STRATEGIES = ("tp", "tp-sp", "ulysses", "odysseus")
ZERO3_STRATEGIES = ("ulysses+zero3", "odysseus+zero3")
PLAN_STRATEGIES = BASE_STRATEGIES + ZERO3_STRATEGIES
"""Everything :func:`predict` ranks: the four strategies and the two ZeRO-3 variants."""

HOST_EXCHANGES = {"tp": 0, "tp-sp": 2, "ulysses": 1, "odysseus": 1}
"""``exchange_lengths`` calls per block forward (one per sequence-split module that gathers or
all-to-alls; SeqParallelFFN needs none). ``perf/comm_volume.py`` checks these against the ledger's
``metadata`` records."""


def base_strategy(strategy: str) -> str:
    """``"odysseus+zero3"`` -> ``"odysseus"``; raises on an unknown name."""
    if strategy not in PLAN_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {PLAN_STRATEGIES}")
    return strategy.split("+")[0]


def heads_feasible(config: TransformerConfig, world: int) -> str | None:
    """Why ``world`` ranks cannot split this block's heads (every strategy needs one query head per rank), or None."""
    if world > config.num_heads:
        return f"N={world} > {config.num_heads} query heads (every strategy splits heads)"
    return None


# --- per-rank shapes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RankShape:
    tokens: int
    """This rank's sequence shard L_r."""
    q_heads: int
    kv_heads: int
    uniform: bool
    """Local query heads read local kv heads in equal consecutive groups (no kv expansion)."""
    ffn_cols: int
    """This rank's FFN columns under TP."""


def _rank_shape(config: TransformerConfig, seq: int, world: int, rank: int) -> _RankShape:
    heads = HeadSplit.build(config, world, rank)
    q = heads.q[rank][1] - heads.q[rank][0]
    kv = heads.kv[rank][1] - heads.kv[rank][0]
    return _RankShape(
        tokens=shard_sizes(seq, world)[rank],
        q_heads=q,
        kv_heads=kv,
        uniform=uniform_gqa(list(heads.kv_of_q), kv),
        ffn_cols=shard_sizes(config.intermediate_size, world)[rank],
    )


# --- memory closed forms ------------------------------------------------------------------------------


def _attention_core_bytes(
    B: int, L: int, q: int, kv: int, hd: int, e: int, uniform: bool, v_in_qkv: bool, qkv_width: int
) -> int:
    """What local attention keeps: q, k, v as SDPA/flash sees them, the output and the fp32 log-sum-exp.

    ``v_in_qkv``: v is a view of the fused QKV output (TP family), so its whole storage stays alive.
    Non-uniform GQA expands k and v to one per query head (``index_select``, which keeps its index).
    """
    core = B * L * q * hd * e * 2 + B * q * L * 4  # rotated q, output, lse
    if not uniform:
        return core + 2 * B * L * q * hd * e + 8 * q
    k = B * L * kv * hd * e
    v = B * L * qkv_width * e if v_in_qkv else k
    return core + k + v


def saved_activation_bytes(
    strategy: str, config: TransformerConfig, batch: int, seq: int, world: int, rank: int = 0, dtype_bytes: int = 2
) -> int:
    """Bytes one block's forward keeps for backward on ``rank`` (what ``SavedActivations`` measures).

    Derived from the modules: RMSNorm keeps its fp32 input, the rsqrt and the normalised input;
    each GEMM keeps its input (the gathered full sequence for TP-SP/Odysseus) and the concatenated weight
    copy (``torch.cat`` of q/k/v or gate/up, TP family); RoPE keeps cos/sin; attention keeps q, k, v,
    the output and the log-sum-exp; SwiGLU keeps gate, up, silu(gate) and their product.
    ``perf/memory.py`` checks this against ``SavedActivations`` exactly, at several small shapes.
    """
    s = base_strategy(strategy)
    c, B, e, N = config, batch, dtype_bytes, world
    d, hd, i = c.hidden_size, c.head_dim, c.intermediate_size
    r = _rank_shape(c, seq, N, rank)
    norm_tokens = B * (seq if s == "tp" else r.tokens)
    norms = 2 * norm_tokens * (4 * d + 4 + e * d)
    if s in ("tp", "tp-sp", "odysseus"):
        width = r.q_heads + 2 * r.kv_heads
        attn = B * seq * d * e + d * width * hd * e + 2 * seq * hd * e
        attn += _attention_core_bytes(B, seq, r.q_heads, r.kv_heads, hd, e, r.uniform, True, width * hd)
        if s == "odysseus":
            ffn = B * r.tokens * (d + 4 * i) * e
        else:
            ffn = B * seq * (d + 4 * r.ffn_cols) * e + d * 2 * r.ffn_cols * e
    else:  # ulysses: projections on the shard, attention on all tokens of this rank's heads
        attn = B * r.tokens * d * e + 2 * r.tokens * hd * e + B * r.tokens * c.num_heads * hd * e
        attn += _attention_core_bytes(B, seq, r.q_heads, r.kv_heads, hd, e, r.uniform, False, 0)
        ffn = B * r.tokens * (d + 4 * i) * e
    return norms + attn + ffn


def _fsdp_units(strategy: str, config: TransformerConfig) -> list[list[tuple[int, int]]]:
    """The modules ``odysseus.zero3`` shards, each as the dense ``(dim0, rest)`` of its parameters."""
    shapes = dense_shapes(config)
    d = config.hidden_size
    units = [[(shapes[n][0], shapes[n][1]) for n in ("gate_proj", "up_proj", "down_proj")], [(d, 1)], [(d, 1)]]
    if base_strategy(strategy) == "ulysses":
        units.append([(shapes[n][0], shapes[n][1]) for n in ("q_proj", "k_proj", "v_proj", "o_proj")])
    return units


def _fsdp_local(dim0: int, rest: int, world: int, rank: int) -> tuple[int, int]:
    """(padded, unpadded) numel of ``rank``'s FSDP2 shard: dim 0 in chunks of ceil(dim0/N), zero-padded."""
    chunk = -(-dim0 // world)
    return chunk * rest, max(0, min(chunk, dim0 - rank * chunk)) * rest


def parameter_bytes(
    strategy: str, config: TransformerConfig, world: int, rank: int = 0, dtype_bytes: int = 2
) -> dict[str, int]:
    """One block's ``params``, ``grads`` and ``adamw`` (2 states in the parameter dtype) bytes on ``rank``.

    ZeRO-3 variants: FSDP2 keeps each sharded parameter in a zero-padded buffer of ceil(dim0/N) rows, so
    ``params`` counts the padding; gradients and optimizer states are the unpadded shard.
    """
    s, c, e = base_strategy(strategy), config, dtype_bytes
    shapes = {n: a * b for n, (a, b) in dense_shapes(c).items()}
    d, hd = c.hidden_size, c.head_dim
    r = _rank_shape(c, 1 << 20, world, rank)
    attn_split = (2 * r.q_heads + 2 * r.kv_heads) * hd * d
    if s in ("tp", "tp-sp"):
        local = attn_split + 3 * r.ffn_cols * d + 2 * d
    elif s == "odysseus":
        local = attn_split + shapes["gate_proj"] + shapes["up_proj"] + shapes["down_proj"] + 2 * d
    else:
        local = sum(shapes.values()) + 2 * d
    if "+zero3" not in strategy:
        return {"params": local * e, "grads": local * e, "adamw": 2 * local * e}
    padded = unpadded = attn_split if s == "odysseus" else 0
    for unit in _fsdp_units(strategy, c):
        for dim0, rest in unit:
            p, u = _fsdp_local(dim0, rest, world, rank)
            padded, unpadded = padded + p, unpadded + u
    return {"params": padded * e, "grads": unpadded * e, "adamw": 2 * unpadded * e}


# --- communication closed forms -----------------------------------------------------------------------


def zero3_records(
    strategy: str, config: TransformerConfig, world: int, rank: int = 0, dtype_bytes: int = 2, reshard: bool = True
) -> list[Record]:
    """FSDP2's collectives for one block of ``odysseus.zero3``, as (phase, op, category, bytes received).

    Per sharded module: one all-gather of its padded shards in forward, another in backward when
    ``reshard`` (parameters freed after forward), and one reduce-scatter of the gradients. Each rank
    receives the other ranks' padded shards: ``(N-1) * sum ceil(dim0/N) * rest`` elements per op.
    ``odysseus.zero3`` reshards after forward by default; ``reshard=False`` models
    ``zero3(par, reshard_after_forward=False)``.
    """
    if world == 1:
        return []
    out: list[Record] = []
    for unit in _fsdp_units(strategy, config):
        b = (world - 1) * sum(_fsdp_local(dim0, rest, world, rank)[0] for dim0, rest in unit) * dtype_bytes
        out.append(("forward", "all_gather", "weight", b))
        if reshard:
            out.append(("backward", "all_gather", "weight", b))
        out.append(("backward", "reduce_scatter", "gradient", b))
    return out


def strategy_records(
    strategy: str,
    config: TransformerConfig,
    batch: int,
    seq: int,
    world: int,
    rank: int = 0,
    dtype_bytes: int = 2,
    reshard: bool = True,
) -> list[Record]:
    """Every collective of one block's forward+backward+gradient sync on ``rank``, ZeRO-3 variants included.

    For a ZeRO-3 variant, FSDP2 replaces ``finalize_grads``' all-reduce of the replicated weights; what it
    leaves (the GQA-shared k/v rows of Odysseus) is still all-reduced.
    """
    s = base_strategy(strategy)
    recs = expected_records(s, config, batch, seq, world, rank, dtype_bytes)
    if "+zero3" not in strategy:
        return recs
    recs = [x for x in recs if x[2] != "gradient"]
    if s == "odysseus" and HeadSplit.build(config, world, rank).shared_kv:
        kv = 2 * config.num_kv_heads * config.head_dim * config.hidden_size
        chunk = shard_sizes(kv, world)[rank]
        recs.append(("backward", "all_reduce", "gradient", ((kv - chunk) + (world - 1) * chunk) * dtype_bytes))
    return recs + zero3_records(strategy, config, world, rank, dtype_bytes, reshard)


# --- flops --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Gemm:
    name: str
    flops: float
    """Forward flops; the backward does twice as many."""
    fused: bool = False
    """Fused with an all-gather (forward) / reduce-scatter (its dgrad) or the reverse, in one overlap op."""


def _gemms(strategy: str, config: TransformerConfig, batch: int, seq: int, world: int, rank: int) -> list[_Gemm]:
    s, c, B = base_strategy(strategy), config, batch
    d, hd, i = c.hidden_size, c.head_dim, c.intermediate_size
    r = _rank_shape(c, seq, world, rank)
    if s in ("tp", "tp-sp", "odysseus"):
        fused = s != "tp"
        out = [
            _Gemm("attn.qkv", 2 * B * seq * d * (r.q_heads + 2 * r.kv_heads) * hd, fused),
            _Gemm("attn.out", 2 * B * seq * r.q_heads * hd * d, fused),
        ]
    else:
        out = [
            _Gemm("attn.qkv", 2 * B * r.tokens * d * (c.num_heads + 2 * c.num_kv_heads) * hd),
            _Gemm("attn.out", 2 * B * r.tokens * c.num_heads * hd * d),
        ]
    if s in ("tp", "tp-sp"):
        out += [
            _Gemm("ffn.up", 2 * B * seq * d * 2 * r.ffn_cols, s == "tp-sp"),
            _Gemm("ffn.down", 2 * B * seq * r.ffn_cols * d, s == "tp-sp"),
        ]
    else:
        out += [_Gemm("ffn.up", 2 * B * r.tokens * d * 2 * i), _Gemm("ffn.down", 2 * B * r.tokens * i * d)]
    return out


def attention_flops(config: TransformerConfig, batch: int, seq: int, heads: int) -> float:
    """Forward flops of causal attention for ``heads`` query heads: QK^T and PV over half the L x L scores."""
    per_head = 4 * seq * seq * config.head_dim
    return batch * heads * (per_head / 2 if config.causal else per_head)


# --- the model ----------------------------------------------------------------------------------------


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


def _comm_time(nbytes: float, op: str, world: int, hw: Hardware, a: Assumptions) -> float:
    """Seconds for one rank to receive ``nbytes`` in collective ``op``, plus its fixed latency.

    Within a node every byte crosses the intra-node link. Across nodes a ring (all-gather, reduce-scatter,
    all-reduce) is as slow as its slowest hop, the NIC; an all-to-all sends each peer its own share, so
    only the share bound for other nodes crosses the NIC while the rest moves on the node's fabric.
    """
    eff = a.link_efficiency * a.collective_efficiency.get(op, 1.0)
    if world <= hw.gpus_per_node or hw.inter_node_bw is None:
        t = nbytes / hw.intra_node_bw
    elif op == "all_to_all":
        remote = (world - hw.gpus_per_node) / (world - 1)
        t = max(nbytes * remote / hw.inter_node_bw, nbytes * (1 - remote) / hw.intra_node_bw)
    else:
        t = nbytes / min(hw.inter_node_bw, hw.intra_node_bw)
    # An all-reduce is a reduce-scatter then an all-gather (as the ledger counts it): two latencies.
    return t / eff + a.collective_latency_s * (2 if op == "all_reduce" else 1)


def block_cost(
    strategy: str,
    config: TransformerConfig,
    batch: int,
    seq: int,
    world: int,
    hw: Hardware,
    assumptions: Assumptions,
    backend: str = "naive",
    recompute: bool = False,
    dtype_bytes: int = 2,
    rank: int = 0,
) -> Cost:
    """One block's forward+backward (+ gradient sync) on ``rank``; see the module docstring for the terms."""
    a = assumptions
    if backend not in a.overlap:
        raise ValueError(f"no overlap fraction for backend {backend!r}; assumptions know {sorted(a.overlap)}")
    s = base_strategy(strategy)
    gemm_rate = hw.peak_flops * a.gemm_efficiency
    attn_rate = hw.peak_flops * a.attention_efficiency
    gemms = _gemms(strategy, config, batch, seq, world, rank)
    heads = _rank_shape(config, seq, world, rank).q_heads
    attn_f = attention_flops(config, batch, seq, heads)
    gemm_f = sum(g.flops for g in gemms)
    fwd = gemm_f / gemm_rate + attn_f / attn_rate
    bwd = 2 * gemm_f / gemm_rate + 2.5 * attn_f / attn_rate
    passes = 2 if recompute else 1  # recomputation reruns the forward, collectives included
    cost = Cost(compute_s=passes * fwd + bwd, flops=(passes + 2) * gemm_f + (passes + 2.5) * attn_f)

    # A fused op's collective can hide behind its GEMM in forward, and behind that GEMM's dgrad (the dual
    # op, same flops) in backward: all-gathers feed QKV/up forward and out/down backward.
    gemm_s = {g.name: g.flops / gemm_rate for g in gemms if g.fused}
    partners = {
        ("forward", "all_gather"): ["attn.qkv", "ffn.up"],
        ("forward", "reduce_scatter"): ["attn.out", "ffn.down"],
        ("backward", "all_gather"): ["attn.out", "ffn.down"],
        ("backward", "reduce_scatter"): ["attn.qkv", "ffn.up"],
    }
    partners = {k: [gemm_s[n] for n in v if n in gemm_s] for k, v in partners.items()}
    f = a.overlap[backend]
    budget = {"forward": passes * fwd, "backward": bwd}
    for phase, op, category, nbytes in strategy_records(strategy, config, batch, seq, world, rank, dtype_bytes):
        t = _comm_time(nbytes, op, world, hw, a)
        reps = passes if category == "activation" and phase == "forward" else 1
        cost.link_s += reps * t
        cost.comm_bytes += reps * nbytes
        cost.collectives += reps
        if category == "activation":
            # TP all-reduces and Ulysses all-to-alls have no partner: they sit between dependent computations.
            hide = partners[(phase, op)].pop(0) if partners.get((phase, op)) else 0.0
            exposed = t - f * min(t, hide)
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
    cost.exposed_comm_s += passes * HOST_EXCHANGES[s] * a.host_exchange_latency_s if world > 1 else 0.0
    return cost


@dataclass
class Prediction:
    """The planner's verdict on one strategy for one (model, sequence, GPUs, hardware)."""

    strategy: str
    feasible: bool
    """The strategy can run at all (heads, GPUs in the preset)."""
    fits: bool
    """Its peak memory fits the usable device memory."""
    recompute: bool
    """Full activation recomputation was needed to fit (or was forced)."""
    step_s: float
    cost: Cost
    memory: dict[str, float]
    """Peak bytes per rank by part: params, grads, optimizer, activations, transient, total."""
    note: str = ""
    rank: int = 0
    """1-based place in the ranking (0: not ranked)."""
    reason: str = ""
    """For the winner: why it wins."""

    @property
    def bound(self) -> str:
        """``compute`` or ``comm``: which part is the larger share of this strategy's step."""
        return "comm" if self.cost.time_s - self.cost.compute_s > self.cost.compute_s else "compute"


def memory_bytes(
    strategy: str,
    model: Model,
    batch: int,
    seq: int,
    world: int,
    assumptions: Assumptions,
    recompute: bool,
    dtype_bytes: int = 2,
    rank: int = 0,
) -> dict[str, float]:
    """Peak bytes on ``rank`` for a whole model step, by part (see :class:`Prediction`)."""
    a, c, s = assumptions, model.config(), base_strategy(strategy)
    zero3 = "+zero3" in strategy
    block = parameter_bytes(strategy, c, world, rank, 1)  # element counts
    per_layer = block["params"]
    d, V = c.hidden_size, model.vocab_size
    vocab_mats = 1 if model.tied_embeddings else 2
    nonblock = vocab_mats * V * d + d  # embedding (+ LM head) + final norm
    if s in ("tp", "tp-sp") or zero3:
        nonblock = vocab_mats * -(-V // world) * d + (-(-d // world) if zero3 else d)  # vocab-parallel or sharded
    params = model.num_layers * per_layer + nonblock
    out = {
        "params": params * a.param_bytes,
        "grads": params * a.grad_bytes,
        "optimizer": params * a.optimizer_bytes,
    }
    saved = saved_activation_bytes(s, c, batch, seq, world, rank, dtype_bytes)
    if recompute:
        tokens = seq if s == "tp" else shard_sizes(seq, world)[rank]
        out["activations"] = model.num_layers * batch * tokens * d * dtype_bytes + saved
    else:
        out["activations"] = model.num_layers * saved
    transient = batch * seq * -(-V // world) * a.logits_bytes  # logits, vocab- or sequence-split: L*V/N each
    if zero3:
        gathered = sum(a0 * b0 for unit in _fsdp_units(strategy, c) for a0, b0 in unit)
        transient += gathered * (2 * a.param_bytes + a.grad_bytes)  # this block + the prefetched one, its grads
    out["transient"] = transient
    out["total"] = sum(out.values())
    return out


def _model_step(
    strategy: str,
    model: Model,
    batch: int,
    seq: int,
    world: int,
    hw: Hardware,
    a: Assumptions,
    backend: str,
    recompute: bool,
    dtype_bytes: int,
) -> Cost:
    """The slowest rank's step: every block, plus the LM head's flops and the gradient sync of non-block weights."""
    c, s = model.config(), base_strategy(strategy)
    per_rank = [
        block_cost(strategy, c, batch, seq, world, hw, a, backend, recompute, dtype_bytes, r) for r in range(world)
    ]
    cost = max(per_rank, key=lambda x: x.time_s) * model.num_layers
    head_flops = 6 * batch * seq * c.hidden_size * model.vocab_size / world
    head = Cost(compute_s=head_flops / (hw.peak_flops * a.gemm_efficiency), flops=head_flops)
    if world > 1 and s in ("ulysses", "odysseus"):
        # Replicated embedding and LM head: their gradients are summed like the FFN's (or by FSDP2).
        n = (1 if model.tied_embeddings else 2) * model.vocab_size * c.hidden_size
        # All-reduce: 2(N-1)/N of them; FSDP2: all-gather in forward and backward plus reduce-scatter, 3(N-1)/N.
        nbytes = (3 if "+zero3" in strategy else 2) * (world - 1) / world * n * dtype_bytes
        t = _comm_time(nbytes, "all_reduce", world, hw, a)
        overlap = a.zero3_overlap if "+zero3" in strategy else a.grad_overlap
        head += Cost(exposed_comm_s=t - overlap * min(t, cost.compute_s), link_s=t, comm_bytes=nbytes, collectives=1)
    return cost + head


def predict(
    model: str | Model,
    seq: int,
    gpus: int,
    hardware: str | Hardware,
    *,
    batch: int = 1,
    strategies: Sequence[str] = PLAN_STRATEGIES,
    backend: str = "symm",
    recompute: str = "auto",
    assumptions: Assumptions | None = None,
    dtype_bytes: int = 2,
) -> list[Prediction]:
    """Predict step time and peak memory per rank of each strategy and rank them (fastest that fits first).

    ``model``/``hardware``: a preset name (:data:`MODELS`, :data:`HARDWARE`) or an object. ``seq`` tokens
    of ``batch`` sequences are split over ``gpus`` ranks. ``backend``: the ``odysseus.overlap`` backend
    whose overlap fraction applies to TP-SP/Odysseus. ``recompute``: ``"auto"`` recomputes activations
    only where they do not fit otherwise, ``"never"``/``"always"`` force it. The first entry of the list
    carries the reason it won in ``reason``.
    """
    model = get_model(model) if isinstance(model, str) else model
    hw = get_hardware(hardware) if isinstance(hardware, str) else hardware
    a = assumptions or Assumptions()
    for name, value in (("seq", seq), ("gpus", gpus), ("batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    if recompute not in ("auto", "never", "always"):
        raise ValueError(f"recompute={recompute!r}; expected 'auto', 'never' or 'always'")
    if seq < gpus:
        raise ValueError(f"seq={seq} tokens cannot be split over gpus={gpus}")
    capacity = hw.memory_bytes * a.usable_memory_fraction
    out = []
    for strategy in strategies:
        base_strategy(strategy)
        why = heads_feasible(model.config(), gpus)
        if why is None and gpus > hw.max_gpus:
            why = f"N={gpus} > {hw.gpus_per_node} GPUs in one {hw.name} node (no inter-node link in the preset)"
        if why is not None:
            out.append(Prediction(strategy, False, False, False, math.inf, Cost(), {}, note=why))
            continue
        options = {"auto": (False, True), "never": (False,), "always": (True,)}[recompute]
        for rc in options:
            mem = {
                k: max(
                    memory_bytes(strategy, model, batch, seq, gpus, a, rc, dtype_bytes, r)[k]
                    for r in (0, gpus - 1)  # rank 0 holds the largest shards, the last the smallest
                )
                for k in ("params", "grads", "optimizer", "activations", "transient", "total")
            }
            fits = mem["total"] <= capacity
            if fits or rc == options[-1]:
                break
        cost = _model_step(strategy, model, batch, seq, gpus, hw, a, backend, rc, dtype_bytes)
        note = "" if fits else f"needs {mem['total'] / 1e9:.1f} GB > {capacity / 1e9:.1f} GB usable"
        out.append(Prediction(strategy, True, fits, rc, cost.time_s, cost, mem, note))
    ranked = sorted(out, key=lambda p: (not p.feasible, not p.fits, p.step_s))
    for k, p in enumerate(ranked, 1):
        p.rank = k if p.feasible and p.fits else 0
    if ranked and ranked[0].rank == 1:
        ranked[0].reason = _reason(ranked, model, batch, seq, gpus, hw, a, backend, dtype_bytes)
    return ranked


def _reason(
    ranked: list[Prediction],
    model: Model,
    batch: int,
    seq: int,
    gpus: int,
    hw: Hardware,
    a: Assumptions,
    backend: str,
    dtype_bytes: int,
) -> str:
    """Why the winner wins: ``memory`` if a strategy that would be faster without the memory limit (no
    recomputation, whatever the footprint) does not fit or must recompute, or if the runner-up must
    recompute and the winner need not; else the larger of the compute and communication differences to
    the runner-up."""
    win = ranked[0]
    unconstrained = {
        p.strategy: _model_step(p.strategy, model, batch, seq, gpus, hw, a, backend, False, dtype_bytes).time_s
        for p in ranked
        if p.feasible
    }
    faster = [s for s, t in unconstrained.items() if t < win.step_s * 0.98 and s != win.strategy]
    if faster:
        best = min(faster, key=unconstrained.get)
        loser = next(p for p in ranked if p.strategy == best)
        keep = max(
            memory_bytes(best, model, batch, seq, gpus, a, False, dtype_bytes, r)["total"] for r in (0, gpus - 1)
        )
        how = "does not fit at all" if not loser.fits else "must recompute activations to fit"
        return (
            f"memory: {best} would take {unconstrained[best] * 1e3:.0f} ms with unlimited memory, but it needs "
            f"{keep / 1e9:.1f} GB without recomputation (> {hw.memory_bytes * a.usable_memory_fraction / 1e9:.0f} GB "
            f"usable) and {how}; "
            f"{win.strategy} fits" + (" with recomputation" if win.recompute else "")
        )
    runner = next((p for p in ranked[1:] if p.rank), None)
    if runner is None:
        return f"only feasible strategy that fits; {win.bound}-bound"
    gap = runner.step_s - win.step_s
    if gap < 0.02 * win.step_s:
        return f"tie with {runner.strategy} within 2%; {win.bound}-bound"
    if runner.recompute and not win.recompute:
        return (
            f"memory: {runner.strategy} (next, {gap / runner.step_s:.0%} slower) must recompute activations to fit "
            f"in {hw.memory_bytes * a.usable_memory_fraction / 1e9:.0f} GB; {win.strategy} keeps them"
        )
    d_compute = runner.cost.compute_s - win.cost.compute_s
    d_comm = (runner.step_s - runner.cost.compute_s) - (win.step_s - win.cost.compute_s)
    kind = "comm-bound" if d_comm >= d_compute else "compute-bound"
    what = "less exposed communication" if kind == "comm-bound" else "less compute"
    return f"{kind}: {gap / runner.step_s:.0%} faster than {runner.strategy} through {what}"


_UNRESOLVED = 1e30
"""Rate or bandwidth given to a term the fit put no weight on."""

# --- calibration --------------------------------------------------------------------------------------


_KINDS = {"all_gather": "ag/rs", "reduce_scatter": "ag/rs", "all_to_all": "all_to_all", "all_reduce": "all_reduce"}
"""Collective kinds the calibration gives a bandwidth each. All-gather and reduce-scatter always come in
equal bytes in these strategies, so one run cannot tell them apart: they share one."""
_GROUPS = ("ag/rs", "all_to_all", "all_reduce")


@dataclass(frozen=True)
class Calibration:
    """Rate, bandwidth per collective kind and per-collective latency, fitted to a ``bench_layer.py`` run."""

    flops_per_s: float
    bytes_per_s: dict[str, float]
    """Per kind in :data:`_GROUPS`; ``_UNRESOLVED`` where the run gave that term no weight."""
    latency_s: float
    source: str
    residual: float
    """Root mean square of (predicted - measured) / measured over the fitted rows."""
    rows: list[dict] = field(default_factory=list)
    """The measured rows with their predicted time added (``predicted_s``)."""

    def hardware(self) -> Hardware:
        """A :class:`Hardware` whose peaks are the fitted values (one node of the bench's world size).

        Its link bandwidth is the fastest fitted kind; :meth:`assumptions` scales the others down.
        """
        world = max((r["world"] for r in self.rows), default=1)
        src = f"fitted by odysseus.plan.calibrate from {self.source}"
        return Hardware(
            name="calibrated",
            description=f"fitted to {self.source}",
            peak_flops=self.flops_per_s,
            memory_bytes=max((r.get("memory_bytes", 0) for r in self.rows), default=0) or 1e18,
            intra_node_bw=max(self.bytes_per_s.values()),
            gpus_per_node=world,
            sources={
                "peak_flops": src,
                "memory_bytes": f"{self.source}: host memory per rank recorded by the bench",
                "intra_node_bw": src,
                "gpus_per_node": f"{self.source}: world size of the run",
            },
        )

    def assumptions(self) -> Assumptions:
        """Efficiencies of 1 (folded into the fitted rates), the fitted latency and per-kind bandwidth
        ratios, no overlap (the fit uses the naive backend)."""
        base = Assumptions()
        src = f"fitted by odysseus.plan.calibrate from {self.source}"
        fastest = max(self.bytes_per_s.values())
        return dataclasses.replace(
            base,
            gemm_efficiency=1.0,
            attention_efficiency=1.0,
            link_efficiency=1.0,
            collective_latency_s=self.latency_s,
            host_exchange_latency_s=self.latency_s,
            collective_efficiency={k: self.bytes_per_s[g] / fastest for k, g in _KINDS.items()},
            sources={
                **base.sources,
                **{k: f"1: {src}" for k in ("gemm_efficiency", "attention_efficiency", "link_efficiency")},
                "collective_latency_s": src,
                "host_exchange_latency_s": src,
                "collective_efficiency": src,
            },
        )

    def predict_row(self, row: dict) -> float:
        """Predicted seconds of one bench row (one forward+backward+sync of ``row['layers']`` blocks)."""
        cfg = TransformerConfig(**row["config"])
        cost = block_cost(
            row["strategy"],
            cfg,
            row["batch"],
            row["seq"],
            row["world"],
            self.hardware(),
            self.assumptions(),
            "naive",
            dtype_bytes=row["dtype_bytes"],
        )
        return cost.time_s * row["layers"]


def _features(row: dict) -> list[float]:
    """Flops, bytes received per kind in :data:`_GROUPS`, and latency units of one bench row.

    Latency units count one per collective (two per all-reduce) and one per length exchange: the time
    :func:`block_cost` gives when rate and bandwidth are infinite and every latency is 1 s.
    """
    cfg = TransformerConfig(**row["config"])
    names = ("peak_flops", "memory_bytes", "intra_node_bw", "gpus_per_node")
    probe_hw = Hardware("probe", 1e300, 1.0, 1e300, row["world"], sources=dict.fromkeys(names, "probe"))
    ones = dataclasses.replace(
        Assumptions(),
        gemm_efficiency=1.0,
        attention_efficiency=1.0,
        link_efficiency=1.0,
        collective_latency_s=1.0,
        host_exchange_latency_s=1.0,
    )
    args = (row["strategy"], cfg, row["batch"], row["seq"], row["world"])
    latency = block_cost(*args, probe_hw, ones, "naive", dtype_bytes=row["dtype_bytes"])
    by_kind = dict.fromkeys(_GROUPS, 0.0)
    for _, op, _, nbytes in strategy_records(*args, 0, row["dtype_bytes"]):
        by_kind[_KINDS[op]] += nbytes
    k = row["layers"]
    return [k * latency.flops, *(k * by_kind[g] for g in _GROUPS), k * latency.time_s]


def _nonneg_lstsq(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Least squares with x >= 0 for a handful of unknowns: the best solution over every active set."""
    best, best_err = torch.zeros(A.shape[1], dtype=A.dtype), float(b.square().sum())
    for k in range(1, A.shape[1] + 1):
        for cols in itertools.combinations(range(A.shape[1]), k):
            sol = torch.linalg.lstsq(A[:, cols], b[:, None]).solution[:, 0]
            if (sol < 0).any():
                continue
            x = torch.zeros(A.shape[1], dtype=A.dtype)
            x[list(cols)] = sol
            err = float((A @ x - b).square().sum())
            if err < best_err:
                best, best_err = x, err
    return best


def calibrate(bench: str | dict) -> Calibration:
    """Fit seconds per flop, per byte of each collective kind, and per collective to a ``bench_layer.py`` JSON.

    Uses the rows measured with the ``naive`` backend (or strategies without one), where nothing overlaps,
    so ``time = flops/rate + sum_kind bytes_kind/bandwidth_kind + latency_units*latency`` holds term by
    term. Kinds get separate bandwidths because they can differ a lot (on CPU gloo a reduce-scatter moves
    a byte several times slower than an all-gather). Rows are weighed by 1/measured time (relative
    errors) and every coefficient is kept >= 0.
    """
    source = bench if isinstance(bench, str) else bench.get("source", "bench")
    data = json.load(open(bench)) if isinstance(bench, str) else bench
    rows = []
    for r in data["results"]:
        if r.get("status") != "ok" or r["backend"] not in ("naive", "n/a"):
            continue
        if r["strategy"] not in BASE_STRATEGIES:
            continue
        rows.append(
            {
                **r,
                "config": data["config"],
                "batch": data["batch"],
                "world": data["world"],
                "layers": data["layers"],
                "dtype_bytes": data["dtype_bytes"],
                "memory_bytes": data.get("memory_bytes_per_rank", 0),
            }
        )
    if len(rows) < 3:
        raise ValueError(f"{source}: {len(rows)} usable rows (status ok, naive backend); need at least 3 to fit")
    feats = torch.tensor([_features(r) for r in rows], dtype=torch.float64)
    meas = torch.tensor([r["median_s"] for r in rows], dtype=torch.float64)
    scale = feats.abs().amax(0).clamp_min(1e-30)
    x = _nonneg_lstsq(feats / scale / meas[:, None], torch.ones_like(meas)) / scale
    pred = feats @ x
    residual = float(((pred - meas) / meas).square().mean().sqrt())

    def rate(coef: torch.Tensor) -> float:
        # A coefficient fitted to 0 means its term never mattered in this run: the rate is then "infinite".
        return 1 / max(float(coef), 1 / _UNRESOLVED)

    bandwidths = {g: rate(x[1 + k]) for k, g in enumerate(_GROUPS)}
    cal = Calibration(rate(x[0]), bandwidths, float(x[-1]), source, residual)
    for r, p in zip(rows, pred.tolist()):
        cal.rows.append({**r, "predicted_s": p})
    return cal


# --- CLI ----------------------------------------------------------------------------------------------


def _fmt_gb(b: float) -> str:
    return f"{b / 1e9:.1f}"


def format_table(preds: list[Prediction]) -> str:
    """A markdown table of the ranking."""
    lines = [
        "| # | strategy | fits | recompute | step ms | compute ms | exposed comm ms | link ms "
        "| GB recv/rank | params+grads+optim GB | activations GB | transient GB | peak GB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in preds:
        if not p.feasible:
            lines.append(f"| - | {p.strategy} | infeasible | | | | | | | | | | | {p.note} |")
            continue
        m, c = p.memory, p.cost
        lines.append(
            f"| {p.rank or '-'} | {p.strategy} | {'yes' if p.fits else 'NO'} | {'yes' if p.recompute else 'no'} "
            f"| {p.step_s * 1e3:.0f} | {c.compute_s * 1e3:.0f} | {c.exposed_comm_s * 1e3:.0f} | {c.link_s * 1e3:.0f} "
            f"| {c.comm_bytes / 1e9:.1f} | {_fmt_gb(m['params'] + m['grads'] + m['optimizer'])} "
            f"| {_fmt_gb(m['activations'])} | {_fmt_gb(m['transient'])} | {_fmt_gb(m['total'])} | {p.note} |"
        )
    return "\n".join(lines)


def calibration_report(cal: Calibration) -> str:
    """The fitted values and a measured-against-predicted table of the fitted rows."""
    bw = ", ".join(
        f"{g} {b / 1e9:.3f} GB/s" if b < _UNRESOLVED else f"{g} not resolved" for g, b in cal.bytes_per_s.items()
    )
    lines = [
        f"calibrated from {cal.source}: {cal.flops_per_s / 1e9:.2f} GFLOP/s; {bw}; "
        f"{cal.latency_s * 1e6:.0f} us per collective; rms relative error {cal.residual:.0%}",
        "",
        "| strategy | backend | seq | measured ms | predicted ms |",
        "|---|---|---|---|---|",
    ]
    for r in cal.rows:
        lines.append(
            f"| {r['strategy']} | {r['backend']} | {r['seq']} "
            f"| {r['median_s'] * 1e3:.1f} | {r['predicted_s'] * 1e3:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m odysseus.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=sorted(MODELS), help="model preset")
    p.add_argument("--seq", type=int, help="tokens per sequence")
    p.add_argument("--gpus", type=int, help="ranks the layer is split over")
    p.add_argument("--hardware", default="h100-nvlink", choices=sorted(HARDWARE))
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument(
        "--backend",
        default="symm",
        choices=sorted(Assumptions().overlap),
        help="odysseus.overlap backend of TP-SP/Odysseus: sets how much of their all-gathers/reduce-scatters hide",
    )
    p.add_argument("--recompute", default="auto", choices=("auto", "never", "always"))
    p.add_argument("--grad-overlap", type=float, help="fraction of gradient all-reduce hidden behind backward")
    p.add_argument("--calibrate", metavar="BENCH_JSON", help="fit rate/bandwidth/latency to a bench_layer.py run")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    args = p.parse_args(argv)
    a = (
        Assumptions()
        if args.grad_overlap is None
        else dataclasses.replace(Assumptions(), grad_overlap=args.grad_overlap)
    )
    hw: Hardware = get_hardware(args.hardware)
    backend = args.backend
    if args.calibrate:
        cal = calibrate(args.calibrate)
        print(calibration_report(cal))
        hw, a, backend = cal.hardware(), cal.assumptions(), "naive"
        if args.model is None:
            return
        print()
    if args.model is None or args.seq is None or args.gpus is None:
        p.error("--model, --seq and --gpus are required (unless only --calibrate is given)")
    preds = predict(
        args.model, args.seq, args.gpus, hw, batch=args.batch, backend=backend, recompute=args.recompute, assumptions=a
    )
    if args.json:
        # inf (step time of an infeasible strategy) is not JSON: write null.
        rows = [{**dataclasses.asdict(x), "step_s": x.step_s if math.isfinite(x.step_s) else None} for x in preds]
        print(json.dumps(rows, indent=1))
        return
    print(
        f"{args.model}, {args.batch} x {args.seq} tokens over {args.gpus} x {hw.name} "
        f"(backend {backend}, recompute {args.recompute}); per rank, one step of the whole model\n"
    )
    print(format_table(preds))
    win = preds[0]
    if win.rank == 1:
        print(f"\nwinner: {win.strategy} — {win.reason}")
    else:
        print("\nno strategy fits: " + "; ".join(f"{x.strategy}: {x.note}" for x in preds))


if __name__ == "__main__":
    main()
