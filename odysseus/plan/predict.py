"""Peak memory per rank of a whole model step, and the ranking of the strategies (:func:`predict`).

Memory counts parameters, gradients and optimizer states of this rank, the activations saved for
backward (:func:`~odysseus.plan.memory.saved_activation_bytes`) and the largest transient (the logits, one
block's backward from :func:`~odysseus.plan.memory.block_peak`, or ``finalize_grads``' buffers), with
FSDP2's prefetched weights and symm's workspaces. Where activations do not fit, keeping only the shard
(``save_input="auto"``) and full activation recomputation (one more forward) are tried, in that order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..strategies.registry import VARIANTS, Variant
from .case import Case, heads_feasible
from .cost import Cost, model_step, whole_vocab
from .forms import fsdp_gathered_numel
from .longseq import LongSeq, stack_peak
from .memory import kept_input_bytes, saved_activation_bytes, sync_bytes
from .overlap_memory import symm_workspace_bytes
from .presets import Assumptions, Hardware, Model, get_hardware, get_model
from .ring import ring_refusal, ring_weight_numel, zero3_view

_PARTS = ("params", "grads", "optimizer", "activations", "transient", "total", "host")


@dataclass
class Prediction:
    """The planner's verdict on one strategy for one (model, sequence, GPUs, hardware)."""

    strategy: str
    """The variant's name, e.g. ``"odysseus+zero3"``."""
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
    save_input: str = "gathered"
    """What the all-gather⊗GEMMs keep for backward (``"shard"`` adds one all-gather per op in backward)."""
    tokens_per_s_per_gpu: float = 0.0
    """Training throughput of the whole job divided by its GPUs: each replica's ``batch x seq`` tokens per
    step over its ``ring x sp`` GPUs."""
    ring: int = 1
    """The ring degree R of the layout (``odysseus.plan.ring``); 1: no ring."""
    sp: int = 0
    """The ``sp`` size S: the GPUs of one replica are ``ring * sp``."""

    @property
    def label(self) -> str:
        """The strategy, with its layout when it has a ring: ``ulysses (ring 4 x sp 8)``."""
        return f"{self.strategy} (ring {self.ring} x sp {self.sp})" if self.ring > 1 else self.strategy

    @property
    def bound(self) -> str:
        """``compute`` or ``comm``: which part is the larger share of this strategy's step."""
        return "comm" if self.cost.time_s - self.cost.compute_s > self.cost.compute_s else "compute"


def memory_bytes(
    model: Model, case: Case, assumptions: Assumptions, recompute: bool | LongSeq, backend: str = "symm"
) -> dict[str, float]:
    """Peak bytes on ``case.rank`` for a whole model step, by part (see :class:`Prediction`); ``case.config`` is
    one block of ``model``. ``recompute``: the long-sequence options (:class:`~odysseus.plan.longseq.LongSeq`);
    ``True`` is layer checkpointing alone, ``False`` none.

    ``activations``: what the blocks keep at the end of forward on the device (every block's saved tensors, or
    with checkpointing every block's input; none with offload) and the embeddings' output. ``transient``: the
    rest of the step's peak (:func:`~odysseus.plan.longseq.stack_peak` on ``backend``: the loss, one block's
    backward...) beyond the weight gradients, or ``finalize_grads``' buffers for every block (after the
    activations are gone); plus, under ZeRO-3, the next block's weights FSDP2 prefetches, and with
    ``backend="symm"`` its persistent workspaces. ``host``: offloaded bytes (not in ``total``).
    """
    a, N, zero3 = assumptions, case.world, case.variant.zero3
    opt = recompute if isinstance(recompute, LongSeq) else LongSeq(checkpoint=bool(recompute))
    per_layer = sum(p for p, _ in ring_weight_numel(case).values())  # element counts (FSDP2: over ring x sp)
    d, V = case.config.hidden_size, model.vocab_size
    vocab_mats = 1 if model.tied_embeddings else 2
    nonblock = vocab_mats * V * d + d  # embedding (+ LM head) + final norm
    if zero3:  # FSDP2 shards them over ring x sp
        M = zero3_view(case).world
        nonblock = vocab_mats * -(-V // M) * d + -(-d // M)
    elif not whole_vocab(case):  # vocabulary-parallel over sp
        nonblock = vocab_mats * -(-V // N) * d + d
    params = model.num_layers * per_layer + nonblock
    out = {"params": params * a.param_bytes, "grads": params * a.grad_bytes, "optimizer": params * a.optimizer_bytes}
    peak = stack_peak(case, model.num_layers, V, opt, backend)
    x0 = kept_input_bytes(case)  # the embeddings' output, the first block's input (the stack counts beyond it)
    kept = 0 if opt.offload else model.num_layers * (x0 if opt.checkpoint else saved_activation_bytes(case)) - x0
    out["activations"] = kept + x0
    beyond = max(v - peak.gradients[k] for k, v in peak.moments.items())  # gradients are counted in "grads"
    sync = model.num_layers * sync_bytes(case)  # one flat all-reduce buffer for every block's gradients
    transient = max(beyond - kept, sync - out["activations"])
    if zero3:  # the next block's weights, prefetched while this one computes
        transient += fsdp_gathered_numel(case) * a.param_bytes
    if backend == "symm" and case.spec.overlapped and N > 1:
        transient += symm_workspace_bytes(case)
    out["transient"] = transient
    out["total"] = sum(out.values())
    out["host"] = peak.host
    return out


def predict(
    model: str | Model,
    seq: int,
    gpus: int,
    hardware: str | Hardware,
    *,
    batch: int = 1,
    strategies: Sequence[Variant | str] = VARIANTS,
    backend: str = "symm",
    recompute: str = "auto",
    save_input: str = "gathered",
    ring_tokens: int | None = None,
    ring_slots: int = 2,
    assumptions: Assumptions | None = None,
    dtype_bytes: int = 2,
    dp: int = 1,
    ring: int | str = 1,
) -> list[Prediction]:
    """Predict step time and peak memory per rank of each strategy and rank them (fastest that fits first).

    ``model``/``hardware``: a preset name (``MODELS``, ``HARDWARE``) or an object. ``seq`` tokens
    of ``batch`` sequences are split over ``gpus`` ranks (the ``sp`` dim); ``dp`` such replicas, each with
    its own batch, sum their gradients (a ``(dp, sp)`` mesh of ``dp * gpus`` GPUs, dp-major: the data-parallel
    group crosses nodes first; ZeRO-3 variants are planned as hybrid sharding, whose memory per GPU does not
    depend on ``dp``). ``strategies``: variants or their names.
    ``backend``: the ``odysseus.overlap`` backend whose overlap fraction applies to fused collectives.
    ``recompute``: ``"auto"`` recomputes activations only where they do not fit otherwise,
    ``"never"``/``"always"`` force it. ``save_input`` (``odysseus.parallelize``'s option, for the strategies
    that run all-gather⊗GEMMs): ``"gathered"``, ``"shard"``, or ``"auto"``: the gathered input where it fits,
    else only the shard, both tried before recomputation. ``ring_tokens``/``ring_slots``: the ring of
    ``"shard"`` mode (``odysseus.overlap.Ring``). ``ring``: the ring degree R of a ``(dp, ring, sp)`` mesh
    (``gpus = R * S``; the sequence must cut into ``2R`` equal chunks), or ``"auto"``: every R that divides
    ``gpus`` with ``sp`` no larger than the query heads, each layout ranked with the strategies. The first entry
    of the list carries the reason it won in ``reason``.
    """
    model = get_model(model) if isinstance(model, str) else model
    hw = get_hardware(hardware) if isinstance(hardware, str) else hardware
    a = assumptions or Assumptions()
    for name, value in (("seq", seq), ("gpus", gpus), ("batch", batch), ("dp", dp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    if recompute not in ("auto", "never", "always"):
        raise ValueError(f"recompute={recompute!r}; expected 'auto', 'never' or 'always'")
    if save_input not in ("gathered", "shard", "auto"):
        raise ValueError(f"save_input={save_input!r}; expected 'gathered', 'shard' or 'auto'")
    if seq < gpus:
        raise ValueError(f"seq={seq} tokens cannot be split over gpus={gpus}")
    capacity = hw.memory_bytes * a.usable_memory_fraction
    options = {"auto": (False, True), "never": (False,), "always": (True,)}[recompute]
    keeps = {"auto": ("gathered", "shard")}.get(save_input, (save_input,))
    out = []
    for R, variant in ((R, v) for R in ring_layouts(model, seq, gpus, ring) for v in strategies):
        S = gpus // R
        case = Case(variant, model.config(), batch, seq // R, S, 0, dtype_bytes, keeps[0], ring_tokens, ring_slots)
        case = dataclasses.replace(case, ring=R)
        why = ring_refusal(case.spec, R) or heads_feasible(case.config, S)
        if why is None and dp * gpus > hw.max_gpus:
            why = f"N={dp * gpus} > {hw.gpus_per_node} GPUs in one {hw.name} node (no inter-node link in the preset)"
        if why is not None:
            pred = Prediction(case.variant.name, False, False, False, math.inf, Cost(), {}, note=why, ring=R, sp=S)
            out.append((pred, case))
            continue
        tries = [(rc, k) for rc in options for k in (keeps if case.spec.overlapped else keeps[:1])]
        for rc, keep in tries:  # the first that fits: keeping less, then recomputing
            case = dataclasses.replace(case, save_input=keep)
            mem = _peak_memory(model, case, a, rc, backend)
            fits = mem["total"] <= capacity
            if fits:
                break
        cost = model_step(model, case, hw, a, backend, rc, dp)
        note = "" if fits else f"needs {mem['total'] / 1e9:.1f} GB > {capacity / 1e9:.1f} GB usable"
        pred = Prediction(case.variant.name, True, fits, rc, cost.time_s, cost, mem, note, save_input=case.save_input)
        pred.ring, pred.sp = R, S
        pred.tokens_per_s_per_gpu = batch * seq / (cost.time_s * gpus)
        out.append((pred, case))
    ranked = sorted(out, key=lambda pc: (not pc[0].feasible, not pc[0].fits, pc[0].step_s))
    for k, (p, _) in enumerate(ranked, 1):
        p.rank = k if p.feasible and p.fits else 0
    if ranked and ranked[0][0].rank == 1:
        ranked[0][0].reason = _reason(ranked, model, hw, a, backend, dp)
    return [p for p, _ in ranked]


def ring_layouts(model: Model, seq: int, gpus: int, ring: int | str) -> list[int]:
    """The ring degrees to plan: ``ring`` itself (checked), or for ``"auto"`` every divisor R of ``gpus`` whose ``sp``
    is no larger than the query heads and whose ``2R`` chunks are equal (R = 1 always, to show why it fails)."""
    if ring == "auto":
        heads = model.num_heads
        return [
            R for R in range(1, gpus + 1) if gpus % R == 0 and (R == 1 or (gpus // R <= heads and seq % (2 * R) == 0))
        ]
    if not isinstance(ring, int) or isinstance(ring, bool) or ring < 1:
        raise ValueError(f"ring={ring!r} must be a positive int or 'auto'")
    if gpus % ring:
        raise ValueError(f"ring={ring} does not divide gpus={gpus} (the GPUs of one replica are ring x sp)")
    if ring > 1 and seq % (2 * ring):
        raise ValueError(f"seq={seq} does not cut into 2 x ring = {2 * ring} equal chunks")
    return [ring]


def _peak_memory(model: Model, case: Case, a: Assumptions, recompute: bool, backend: str) -> dict[str, float]:
    """Each part's largest value over the ranks: rank 0 holds the largest shards, the last the smallest."""
    per_rank = [memory_bytes(model, case.at(r), a, recompute, backend) for r in (0, case.world - 1)]
    return {k: max(m[k] for m in per_rank) for k in _PARTS}


def _reason(
    ranked: list[tuple[Prediction, Case]], model: Model, hw: Hardware, a: Assumptions, backend: str, dp: int
) -> str:
    """Why the winner wins: ``memory`` if a strategy that would be faster without the memory limit (no
    recomputation, whatever the footprint) does not fit or must recompute, or if the runner-up must
    recompute and the winner need not; else the larger of the compute and communication differences to
    the runner-up."""
    win = ranked[0][0]
    unconstrained = {
        k: model_step(model, case, hw, a, backend, False, dp).time_s for k, (p, case) in enumerate(ranked) if p.feasible
    }
    faster = [k for k, t in unconstrained.items() if t < win.step_s * 0.98 and k != 0]
    capacity_gb = hw.memory_bytes * a.usable_memory_fraction / 1e9
    if faster:
        best = min(faster, key=unconstrained.get)
        loser, case = ranked[best]
        keep = _peak_memory(model, case, a, False, backend)["total"]
        how = "does not fit at all" if not loser.fits else "must recompute activations to fit"
        return (
            f"memory: {loser.label} would take {unconstrained[best] * 1e3:.0f} ms with unlimited memory, but it "
            f"needs {keep / 1e9:.1f} GB without recomputation (> {capacity_gb:.0f} GB usable) and {how}; "
            f"{win.label} fits" + (" with recomputation" if win.recompute else "")
        )
    runner = next((p for p, _ in ranked[1:] if p.rank), None)
    if runner is None:
        return f"only feasible strategy that fits; {win.bound}-bound"
    gap = runner.step_s - win.step_s
    if gap < 0.02 * win.step_s:
        return f"tie with {runner.label} within 2%; {win.bound}-bound"
    if runner.recompute and not win.recompute:
        return (
            f"memory: {runner.label} (next, {gap / runner.step_s:.0%} slower) must recompute activations to fit "
            f"in {capacity_gb:.0f} GB; {win.label} keeps them"
        )
    d_compute = runner.cost.compute_s - win.cost.compute_s
    d_comm = (runner.step_s - runner.cost.compute_s) - (win.step_s - win.cost.compute_s)
    kind = "comm-bound" if d_comm >= d_compute else "compute-bound"
    what = "less exposed communication" if kind == "comm-bound" else "less compute"
    return f"{kind}: {gap / runner.step_s:.0%} faster than {runner.label} through {what}"
