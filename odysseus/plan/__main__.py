"""A cost model that predicts step time and peak memory per rank for each strategy, and picks one.

    python -m odysseus.plan --model llama2-7b --seq 65536 --gpus 8 --hardware h100-nvlink
    python -m odysseus.plan --model llama3-8b --seq 131072 --sp 8 --dp 4   # 4 replicas of 8: 32 GPUs, 4 nodes
    python -m odysseus.plan --calibrate bench.json          # fit rate and bandwidth to a bench_layer.py run
    python -m odysseus.plan --model llama3-8b --gpus 8 --max-seq [--no-offload]   # longest sequence per strategy
    python -m odysseus.plan --model llama3-8b --seq 1048576 --gpus 64 --ring 8    # a (ring 8, sp 8) mesh
    python -m odysseus.plan --model llama3-8b --seq 1048576 --gpus 64 --ring auto # rank every ring x sp layout

What it counts, per rank and per training step of one micro-batch (see docs/PLANNER.md):

- **Compute**: GEMM flops of this rank's share of every projection and causal-attention flops of its
  heads, forward + backward (2x the forward for GEMMs, 2.5x for attention: FlashAttention's backward has
  five GEMMs to the forward's two), against the dense bf16 peak times an achievable-efficiency factor.
- **Communication**: the bytes each rank receives, from the closed forms that ``tests/test_volume.py``
  checks against the CommLedger, plus FSDP2's all-gathers and reduce-scatters for the ZeRO-3 variants
  (checked by ``perf/comm_volume.py``; both in :mod:`odysseus.plan.forms`), against the link
  bandwidth, plus a fixed latency per collective. TP-SP and Odysseus all-gathers/reduce-scatters hide a
  backend-dependent fraction behind the GEMM they are fused with; Ulysses' all-to-all and TP's all-reduce
  hide nothing; gradient syncs hide behind backward compute by a configurable fraction. On a ``(dp, sp)``
  mesh (``--dp``) the gradients are also all-reduced over the replicas, across nodes at the NIC's bandwidth
  once the job spans nodes (``odysseus.plan.data_parallel``); throughput is tokens/s per GPU of the job.
- **Memory**: parameters, gradients and optimizer states of this rank, activations saved for backward
  (checked against ``SavedActivations`` by ``perf/memory.py``), and the largest transient: the logits, one
  block's backward (``odysseus.plan.block_peak``, checked against ``odysseus.training.memtrack.MemoryTracker``) or
  ``finalize_grads``' buffers, plus FSDP2's prefetched weights and symm's workspaces. Where activations
  do not fit, keeping only the shard (``--save-input auto``) and then full activation recomputation (one
  more forward) are tried.
- **Ring** (``--ring R``): the GPUs of a replica are ``R x sp``; the head-parallel part runs over ``sp`` on
  ``L/R`` tokens, attention over the sequence is a ring of point-to-point K/V hops hidden behind each step's
  attention (``odysseus.plan.ring``). ``--ring auto`` ranks every layout; ``--max-seq`` searches R unless given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

from ..strategies.registry import Variant
from .calibrate import calibrate, calibration_report
from .max_seq import MaxSeq, max_seq
from .predict import Prediction, predict
from .presets import HARDWARE, MODELS, Assumptions, Hardware, get_hardware


def registry_overlapped(name: str) -> bool:
    """The variant runs all-gather⊗GEMMs, so ``save_input`` applies to it."""
    return Variant.parse(name).spec.overlapped


def _fmt_gb(b: float) -> str:
    return f"{b / 1e9:.1f}"


def ring_arg(value: str) -> int | str:
    """``--ring``: a positive int or ``auto``."""
    if value == "auto":
        return value
    try:
        ring = int(value)
    except ValueError:
        ring = 0
    if ring < 1:
        raise argparse.ArgumentTypeError(f"--ring {value!r}: expected a positive int (the ring degree) or 'auto'")
    return ring


def format_table(preds: list[Prediction]) -> str:
    """A markdown table of the ranking."""
    lines = [
        "| # | strategy | ring x sp | fits | recompute | save_input | step ms | tok/s/GPU | compute ms "
        "| exposed comm ms | link ms | GB recv/rank | params+grads+optim GB | activations GB | transient GB "
        "| peak GB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in preds:
        if not p.feasible:
            lines.append(f"| - | {p.strategy} | {p.ring} x {p.sp} | infeasible | | | | | | | | | | | | | {p.note} |")
            continue
        m, c = p.memory, p.cost
        keeps = p.save_input if registry_overlapped(p.strategy) else "-"
        lines.append(
            f"| {p.rank or '-'} | {p.strategy} | {p.ring} x {p.sp} | {'yes' if p.fits else 'NO'} "
            f"| {'yes' if p.recompute else 'no'} "
            f"| {keeps} "
            f"| {p.step_s * 1e3:.0f} | {p.tokens_per_s_per_gpu:,.0f} "
            f"| {c.compute_s * 1e3:.0f} | {c.exposed_comm_s * 1e3:.0f} | {c.link_s * 1e3:.0f} "
            f"| {c.comm_bytes / 1e9:.1f} | {_fmt_gb(m['params'] + m['grads'] + m['optimizer'])} "
            f"| {_fmt_gb(m['activations'])} | {_fmt_gb(m['transient'])} | {_fmt_gb(m['total'])} | {p.note} |"
        )
    return "\n".join(lines)


def format_max_seq(rows: list[MaxSeq]) -> str:
    """A markdown table of :func:`~odysseus.plan.max_seq.max_seq`."""
    lines = [
        "| strategy | ring | max seq | options | save_input | step s | tok/s/GPU | device GB | host GB/GPU "
        "| binding at the next length |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in rows:
        mem = m.memory
        dev, host = (f"{mem['total'] / 1e9:.1f}", f"{mem['host'] / 1e9:.0f}") if mem else ("", "")
        keeps = m.save_input if registry_overlapped(m.strategy) else "-"
        step = f"{m.step_s:.1f} | {m.tokens_per_s_per_gpu:,.0f}" if m.seq else " | "
        lines.append(
            f"| {m.strategy} | {m.ring} | {m.seq:,} | {m.options.label() if m.seq else '-'} | {keeps} | {step} "
            f"| {dev} | {host} | {m.binding} |"
        )
    return "\n".join(lines)


def _mesh(dp: int, gpus: int, ring: int | str | None) -> str:
    """``4 replicas x 32 (ring 4 x sp 8)``: the job's layout as the header says it."""
    out = f"{dp} replicas x {gpus}" if dp > 1 else f"{gpus}"
    if isinstance(ring, int) and ring > 1:
        out += f" (ring {ring} x sp {gpus // ring})"
    return out + (" (every ring x sp layout)" if ring == "auto" else "")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m odysseus.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=sorted(MODELS), help="model preset")
    p.add_argument("--seq", type=int, help="tokens per sequence")
    p.add_argument("--sp", type=int, help="ranks each layer is split over (one replica; best within a node)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas, each with its own batch")
    p.add_argument("--gpus", type=int, help="GPUs of one replica, ring x sp (without --ring: shorthand for --sp N)")
    p.add_argument(
        "--ring",
        type=ring_arg,
        help="ring degree R of a (dp, ring, sp) mesh: the sequence is also cut over R ring ranks (ring attention), "
        "sp = GPUs / R; 'auto' ranks every layout (default: 1; --max-seq searches R unless given)",
    )
    p.add_argument("--hardware", default="h100-nvlink", choices=sorted(HARDWARE))
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch and replica")
    p.add_argument(
        "--backend",
        default="symm",
        choices=sorted(Assumptions().overlap),
        help="odysseus.overlap backend of TP-SP/Odysseus: sets how much of their all-gathers/reduce-scatters hide",
    )
    p.add_argument("--recompute", default="auto", choices=("auto", "never", "always"))
    p.add_argument(
        "--save-input",
        default="auto",
        choices=("gathered", "shard", "auto"),
        help="what TP-SP/Odysseus all-gather⊗GEMMs keep for backward: the gathered input, only this rank's "
        "shard (re-gathered in backward), or auto (default: gathered where it fits, else shard, both tried "
        "before recomputation; the library's default is gathered)",
    )
    p.add_argument("--ring-tokens", type=int, help="save_input=shard: tokens per streamed piece (default L_r/4)")
    p.add_argument("--ring-slots", type=int, default=2, help="save_input=shard: pieces in flight")
    p.add_argument("--grad-overlap", type=float, help="fraction of gradient all-reduce hidden behind backward")
    p.add_argument("--calibrate", metavar="BENCH_JSON", help="fit rate/bandwidth/latency to a bench_layer.py run")
    p.add_argument("--max-seq", action="store_true", help="the longest sequence each strategy fits (no --seq)")
    p.add_argument("--no-offload", action="store_true", help="--max-seq without host offload of the layer inputs")
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
    if args.gpus is not None and args.sp is not None:
        p.error("--gpus is shorthand for --sp N --dp 1: give one of --gpus and --sp")
    ring = args.ring
    if ring == "auto" and args.sp is not None:
        p.error("--ring auto searches the sp size: give the GPUs of one replica with --gpus, not --sp")
    # sp: the GPUs of one replica (ring x sp), what predict and max_seq take.
    sp = args.sp * ring if args.sp is not None and isinstance(ring, int) else (args.sp or args.gpus)
    if args.gpus is not None and isinstance(ring, int) and args.gpus % ring:
        p.error(f"--ring {ring} does not divide --gpus {args.gpus} (the GPUs of one replica are ring x sp)")
    if args.no_offload and not args.max_seq:
        p.error("--no-offload applies to --max-seq only")
    if args.max_seq:
        if args.seq is not None:
            p.error(f"--max-seq searches the sequence length: drop --seq {args.seq}")
        if args.model is None or sp is None:
            p.error("--max-seq needs --model and --sp (or --gpus)")
        if ring == "auto":
            p.error("--max-seq searches the ring degree itself: drop --ring auto (or give --ring R to fix it)")
        rows = max_seq(
            args.model,
            sp,
            hw,
            offload=not args.no_offload,
            batch=args.batch,
            backend=backend,
            dp=args.dp,
            assumptions=a,
            ring=ring,  # None: search every ring degree
        )
        if args.json:
            print(json.dumps([{**dataclasses.asdict(m), "options": dataclasses.asdict(m.options)} for m in rows]))
            return
        mesh = _mesh(args.dp, sp, ring)
        print(
            f"{args.model}, batch {args.batch}, over {mesh} x {hw.name} (backend {backend}, offload "
            f"{'no' if args.no_offload else 'allowed'}): the longest sequence each strategy fits, per rank\n"
        )
        print(format_max_seq(rows))
        print("\npredicted by odysseus.plan (memory terms checked on CPU by perf/longseq_memory.py), not measured")
        return
    if args.model is None or args.seq is None or sp is None:
        p.error("--model, --seq and --sp (or --gpus) are required (unless only --calibrate is given)")
    try:
        preds = predict(
            args.model, args.seq, sp, hw, batch=args.batch, backend=backend, recompute=args.recompute, assumptions=a,
            dp=args.dp, save_input=args.save_input, ring_tokens=args.ring_tokens, ring_slots=args.ring_slots,
            ring=ring or 1,
        )  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    if args.json:
        # inf (step time of an infeasible strategy) is not JSON: write null.
        rows = [{**dataclasses.asdict(x), "step_s": x.step_s if math.isfinite(x.step_s) else None} for x in preds]
        print(json.dumps(rows, indent=1))
        return
    mesh = _mesh(args.dp, sp, ring)
    print(
        f"{args.model}, {args.batch} x {args.seq} tokens per replica over {mesh} x {hw.name} "
        f"(backend {backend}, recompute {args.recompute}, save_input {args.save_input}); per rank, one step of "
        "the whole model\n"
    )
    print(format_table(preds))
    win = preds[0]
    if win.rank == 1:
        print(f"\nwinner: {win.label} — {win.reason}")
        gpus = args.dp * sp
        print(f"job: {win.tokens_per_s_per_gpu * gpus:,.0f} tokens/s on {gpus} GPUs (predicted, not measured)")
    else:
        print("\nno strategy fits: " + "; ".join(f"{x.label}: {x.note}" for x in preds))


if __name__ == "__main__":
    main()
