"""The longest sequence each strategy fits (:func:`max_seq`, ``python -m odysseus.plan ... --max-seq``).

For every strategy the options are tried from cheapest to most frugal (:data:`LADDER`: none; layer
checkpointing; + the tiled FFN and the chunked loss; + offload of the kept layer inputs), each with both
``save_input`` modes where the strategy runs all-gather⊗GEMMs; for each a binary search over the sequence
(multiples of the GPUs the sequence is split over; with a ring of R, of ``2R x S``: equal chunks) finds the
longest that fits device memory (and host memory, with offload). With ``ring=None`` (``--max-seq`` without
``--ring``) every ring degree R that divides the GPUs (``sp`` = GPUs / R no larger than the query heads) is
searched too. The longest wins; among equals the fastest. The binding term is what fails at the next length:
host memory, or the device moment of :func:`~odysseus.plan.longseq.stack_peak` and its largest part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ..strategies.registry import VARIANTS, Variant
from .case import Case, heads_feasible
from .cost import model_step
from .longseq import LongSeq, longseq_cost, stack_peak
from .predict import memory_bytes
from .presets import Assumptions, Hardware, Model, get_hardware, get_model
from .ring import ring_refusal

FFN_TILE = 4096
"""Tokens per rank of an FFN tile the planner proposes: its ``(tile, intermediate)`` tensors are small next to
the rest at long sequences, and a tile this long keeps the GEMMs efficient."""
LOSS_CHUNK = 4096
"""Tokens per chunk of the LM head and loss (``model_loss``'s default)."""
LIMIT = 1 << 31
"""The longest sequence searched."""


def ladder(offload: bool, ffn_tile: int = FFN_TILE, loss_chunk: int = LOSS_CHUNK) -> list[LongSeq]:
    """The option sets tried, cheapest first."""
    out = [LongSeq(), LongSeq(checkpoint=True), LongSeq(checkpoint=True, ffn_tile=ffn_tile, loss_chunk=loss_chunk)]
    if offload:
        out.append(LongSeq(checkpoint=True, offload=True, ffn_tile=ffn_tile, loss_chunk=loss_chunk))
    return out


@dataclass
class MaxSeq:
    """The longest sequence one strategy fits, with what it takes."""

    strategy: str
    seq: int
    """Tokens per sequence (0: not even ``gpus`` tokens fit, or the strategy is infeasible)."""
    options: LongSeq
    save_input: str
    step_s: float
    tokens_per_s_per_gpu: float
    memory: dict[str, float]
    """Per rank at ``seq``: params, grads, optimizer, activations, transient, total (device) and host bytes."""
    binding: str
    """What does not fit at the next length (or why the strategy is infeasible)."""
    ring: int = 1
    """The ring degree R of the layout found (``sp`` = GPUs / R)."""


def _case(
    variant: Variant, model: Model, batch: int, seq: int, ring: int, sp: int, keep: str, dtype_bytes: int
) -> Case:
    """One ring rank's case: ``seq / ring`` tokens over ``sp`` ranks."""
    return Case(variant, model.config(), batch, seq // ring, sp, 0, dtype_bytes, keep, ring=ring)


def ring_degrees(model: Model, gpus: int, ring: int | None) -> list[int]:
    """The ring degrees searched: ``ring`` (checked), or every divisor R of ``gpus`` whose ``sp`` fits the heads."""
    if ring is None:
        return [R for R in range(1, gpus + 1) if gpus % R == 0 and gpus // R <= model.num_heads] or [1]
    if not isinstance(ring, int) or isinstance(ring, bool) or ring < 1 or gpus % ring:
        raise ValueError(f"ring={ring!r} must be a positive int dividing gpus={gpus} (the GPUs are ring x sp)")
    return [ring]


def _memory(model: Model, case: Case, a: Assumptions, opt: LongSeq, backend: str) -> dict[str, float]:
    """Each part's largest value over the ranks (rank 0 holds the largest shards, the last the smallest)."""
    per = [memory_bytes(model, case.at(r), a, opt, backend) for r in (0, case.world - 1)]
    return {k: max(m[k] for m in per) for k in per[0]}


def _fits(mem: dict[str, float], hw: Hardware, a: Assumptions) -> bool:
    host = mem["host"] <= (hw.host_memory_bytes or 0) * a.host_usable_fraction
    return mem["total"] <= hw.memory_bytes * a.usable_memory_fraction and host


def _binding(model: Model, case: Case, hw: Hardware, a: Assumptions, opt: LongSeq, backend: str) -> str:
    """Why ``case.seq`` does not fit: host memory, or the device peak's moment and its largest part."""
    mem = _memory(model, case, a, opt, backend)
    host_cap = (hw.host_memory_bytes or 0) * a.host_usable_fraction
    if mem["host"] > host_cap:
        return f"host memory: kept layer inputs {mem['host'] / 1e9:.0f} GB > {host_cap / 1e9:.0f} GB usable per GPU"
    moment = stack_peak(case, model.num_layers, model.vocab_size, opt, backend).moment
    parts = {"weights+grads+optimizer": mem["params"] + mem["grads"] + mem["optimizer"]}
    parts |= {"kept activations": mem["activations"], "transient": mem["transient"]}
    what = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in parts.items())
    cap = hw.memory_bytes * a.usable_memory_fraction
    return f"device memory at {moment} ({what} GB; {mem['total'] / 1e9:.1f} > {cap / 1e9:.1f} GB)"


def _longest(fits, step: int) -> int:
    """The largest multiple of ``step`` up to :data:`LIMIT` where ``fits`` holds (0: none), assuming memory
    grows with the sequence."""
    if not fits(step):
        return 0
    lo = hi = step
    while hi < LIMIT and fits(hi):
        lo, hi = hi, min(hi * 2, LIMIT)
    if fits(hi):
        return hi
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def max_seq(
    model: str | Model,
    gpus: int,
    hardware: str | Hardware,
    *,
    offload: bool = True,
    batch: int = 1,
    strategies: Sequence[Variant | str] = VARIANTS,
    backend: str = "symm",
    dp: int = 1,
    assumptions: Assumptions | None = None,
    dtype_bytes: int = 2,
    ffn_tile: int = FFN_TILE,
    loss_chunk: int = LOSS_CHUNK,
    options: Sequence[LongSeq] | None = None,
    ring: int | None = 1,
) -> list[MaxSeq]:
    """The longest sequence of ``batch`` sequences split over ``gpus`` ranks (``dp`` replicas of them) that each
    strategy fits on ``hardware``, longest first (see the module docstring). ``offload=False`` leaves host
    offload out of the options tried; ``options``: the option sets to try instead of :func:`ladder`'s; ``ring``:
    the ring degree (``gpus = ring x sp``; 1: no ring), None: every feasible one searched (the command line's
    default)."""
    model = get_model(model) if isinstance(model, str) else model
    hw = get_hardware(hardware) if isinstance(hardware, str) else hardware
    a = assumptions or Assumptions()
    for name, value in (("gpus", gpus), ("batch", batch), ("dp", dp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    if offload and (hw.host_memory_bytes is None or hw.host_bw is None):
        raise ValueError(f"hardware {hw.name!r} has no host memory or PCIe bandwidth: pass offload=False")
    tries = list(options) if options is not None else ladder(offload, ffn_tile, loss_chunk)
    rings = ring_degrees(model, gpus, ring)
    out = []
    for variant in strategies:
        variant = Variant.parse(variant) if isinstance(variant, str) else variant
        fitting = [R for R in rings if ring_refusal(variant.spec, R) is None]
        why = (
            ring_refusal(variant.spec, rings[-1])
            if not fitting
            else heads_feasible(model.config(), gpus // fitting[-1])
        )
        if why is None and dp * gpus > hw.max_gpus:
            why = f"N={dp * gpus} > {hw.gpus_per_node} GPUs in one {hw.name} node"
        if why is not None:
            out.append(MaxSeq(variant.name, 0, LongSeq(), "gathered", 0.0, 0.0, {}, why, rings[-1]))
            continue
        rings_here = fitting
        best = None
        keeps = ("gathered", "shard") if variant.spec.overlapped else ("gathered",)
        for R, opt, keep in ((R, o, k) for R in rings_here for o in tries for k in keeps):
            S, step = gpus // R, gpus if R == 1 else 2 * gpus  # a ring cuts 2R equal chunks

            def fits(seq: int, opt=opt, keep=keep, variant=variant, R=R, S=S) -> bool:
                case = _case(variant, model, batch, seq, R, S, keep, dtype_bytes)
                return _fits(_memory(model, case, a, opt, backend), hw, a)

            seq = _longest(fits, step)
            if seq == 0:
                continue
            case = _case(variant, model, batch, seq, R, S, keep, dtype_bytes)
            cost = model_step(model, case, hw, a, backend, opt.checkpoint, dp)
            cost += longseq_cost(model, case, hw, a, backend, opt)
            if best is None or (seq, -cost.time_s) > (best[0], -best[1].time_s):
                best = (seq, cost, opt, keep, R, step)
        if best is None:  # the binding without a ring (or at the one asked for)
            R = rings_here[0]
            case = _case(variant, model, batch, gpus if R == 1 else 2 * gpus, R, gpus // R, keeps[-1], dtype_bytes)
            opt = tries[-1]
            why = _binding(model, case, hw, a, opt, backend)
            out.append(MaxSeq(variant.name, 0, opt, keeps[-1], 0.0, 0.0, {}, why, R))
            continue
        seq, cost, opt, keep, R, step = best
        case = _case(variant, model, batch, seq, R, gpus // R, keep, dtype_bytes)
        mem = _memory(model, case, a, opt, backend)
        binding = _binding(model, dataclasses.replace(case, seq=case.seq + step // R), hw, a, opt, backend)
        tps = batch * seq / (cost.time_s * gpus)
        out.append(MaxSeq(variant.name, seq, opt, keep, cost.time_s, tps, mem, binding, R))
    return sorted(out, key=lambda m: (-m.seq, m.step_s))
