"""Time forward + backward of a block (or a small stack) per strategy and overlap backend; write a trace.

    torchrun --nproc-per-node 8 perf/bench_layer.py --model llama2-7b --seqs 16K --layers 2
    python perf/bench_layer.py --local-world 2 --seqs 256,1024      # forked gloo ranks on this machine

Every configuration (strategy x backend x sequence) is built once; then the timed steps go round-robin
over them, so that a change in machine load hits all of them alike (one step = forward, backward of
``sum(y * dy)``, ``finalize_grads``). Each rank times ``--repeats`` rounds after ``--warmup`` (CUDA
events on GPU, wall clock on CPU); a round takes its slowest rank's time, and a configuration's time is
the median over rounds. On CPU the table reports ratios between configurations measured side by side in
this run: the absolute times are this machine's, not a GPU prediction.

Backends come from ``odysseus.overlap.BACKENDS``; one that cannot run here (``odysseus.overlap.resolve_backend``
refuses it) is reported as skipped, with the reason. A configuration whose step raises is a failure, not a
skip: the exception (naming the configuration) ends the run with a non-zero exit. TP and Ulysses do not
use the overlap ops, so they run once (backend ``n/a``).

Rank 0 then profiles one step of each configuration with ``torch.profiler`` and writes a Chrome trace
(open in chrome://tracing or ui.perfetto.dev), and reports which of the library's named ranges
(``ody/ag_matmul``, ``ody/attn``, ``ody/matmul_rs``, ``ody/ffn``) and which collectives the trace holds. On
CUDA those ranges are NVTX ranges too, so ``nsys profile -t cuda,nvtx torchrun ...`` shows them.

``--input-checks default,off`` builds each configuration with the default input check (a fingerprint of the
block's input in its first length exchange, ``odysseus.comm.prints``) and without it, timed side by side; the
report then gives their ratio and the check's own time (the fingerprint of that input, timed alone) as a
share of the step.

``--json`` writes every measurement; ``python -m odysseus.plan --calibrate that.json`` fits the cost
model's rate and bandwidth to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import common
import torch
import torch.distributed as dist
from torch import nn

import odysseus
from odysseus import finalize_grads, shard_sequence
from odysseus import overlap as ody_overlap
from odysseus.comm.prints import Fingerprinter
from odysseus.launch import run_ranks
from odysseus.plan import MODELS, calibrate, calibration_report, get_model
from odysseus.reference import TransformerBlock, init_weights
from odysseus.strategies.registry import VARIANTS, Variant

RANGES = ("ody/ag_matmul", "ody/attn", "ody/matmul_rs", "ody/ffn")
_COLLECTIVE_HINTS = (
    "all_gather",
    "allgather",
    "reduce_scatter",
    "reducescatter",
    "all_to_all",
    "alltoall",
    "allreduce",
    "all_reduce",
    "nccl:",
    "gloo:",
    "c10d::",
    "isend",
    "irecv",
    "send",
    "recv",
)


def uses_backend(strategy: str) -> bool:
    """Whether ``strategy`` runs the ``odysseus.overlap`` ops (all-gather⊗GEMM, GEMM⊗reduce-scatter): those
    whose attention all-gathers its input and reduce-scatters its output (TP-SP, Odysseus)."""
    return Variant.parse(strategy).spec.attention_comm == "gather_scatter"


def expected_ranges(strategy: str) -> tuple[str, ...]:
    """The named ranges a step of ``strategy`` should show: TP and Ulysses have no all-gather/reduce-scatter GEMMs."""
    return RANGES if uses_backend(strategy) else ("ody/attn", "ody/ffn")


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


INPUT_CHECKS = {"default": None, "off": False, "every": True}
"""``--input-checks`` names -> ``check_inputs`` of :func:`odysseus.parallelize`."""


def _build(
    strategy: str, backend: str, cfg: odysseus.TransformerConfig, layers: int, dtype, device, check: str = "default"
) -> nn.Module:
    """``layers`` blocks with different seeded weights, split by ``strategy``, with the input check ``check``."""
    blocks, variant = [], Variant.parse(strategy)
    for k in range(layers):
        ref = init_weights(TransformerBlock(cfg), seed=k).to(device=device, dtype=dtype)
        backend_arg = "naive" if backend == "n/a" else backend
        par = odysseus.parallelize(ref, variant.spec.name, backend=backend_arg, check_inputs=INPUT_CHECKS[check])
        if variant.zero3:
            par = odysseus.zero3(par, reshard_after_forward=True)
        blocks.append(par)
    return nn.Sequential(*blocks)


class _Timer:
    """Seconds of one call: CUDA events on GPU (the kernels' time), wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


@contextmanager
def _nvtx(name: str, device: torch.device) -> Iterator[None]:
    """An NVTX range around each timed step on CUDA, so nsys timelines say which configuration ran."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def _all_ok(ok: bool, device: torch.device) -> bool:
    """True when every rank says ok (one tiny all-reduce), so all ranks skip a configuration together."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


def _scan_trace(path: str) -> tuple[list[str], list[str]]:
    """(named ody/ ranges, collective op names) found in a Chrome trace."""
    events = json.load(open(path)).get("traceEvents", [])
    names = {e.get("name", "") for e in events if isinstance(e, dict)}
    ranges = sorted(n for n in names if n.startswith("ody/"))
    collectives = sorted(n for n in names if any(h in n.lower() for h in _COLLECTIVE_HINTS))
    return ranges, collectives


def bench_rank(rank: int, world: int, opts: dict) -> dict:
    """Build, time and (rank 0) profile every configuration on this rank; return what it measured."""
    device, dtype = _device(), getattr(torch, opts["dtype"])
    cfg = odysseus.TransformerConfig(**opts["config"])
    pg = dist.group.WORLD
    configs = []
    for strategy in opts["strategies"]:
        for backend in opts["backends"] if uses_backend(strategy) else ["n/a"]:
            reason = ""
            resolve = getattr(ody_overlap, "resolve_backend", None)
            if backend != "n/a" and resolve is not None:
                try:
                    resolve(backend, pg, device)
                except (RuntimeError, ValueError, NotImplementedError) as err:
                    reason = f"{type(err).__name__}: {err}"
            for check in opts["checks"]:
                model = None if reason else _build(strategy, backend, cfg, opts["layers"], dtype, device, check)
                for seq in opts["seqs"]:
                    split = Variant.parse(strategy).spec.sequence_split
                    configs.append(
                        dict(strategy=strategy, backend=backend, seq=seq, model=model, reason=reason,
                             sequence_split=split, check=check)
                    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for seq in opts["seqs"]:
        x = torch.randn(opts["batch"], seq, cfg.hidden_size, generator=g).to(device=device, dtype=dtype)
        dy = torch.randn(opts["batch"], seq, cfg.hidden_size, generator=g).to(device=device, dtype=dtype)
        inputs[seq] = {"full": (x, dy), "shard": (shard_sequence(x), shard_sequence(dy))}

    def step(c: dict) -> None:
        x, dy = inputs[c["seq"]]["shard" if c["sequence_split"] else "full"]
        c["model"].zero_grad(set_to_none=True)
        y = c["model"](x.detach().requires_grad_())
        y.backward(dy)
        finalize_grads(c["model"])

    for c in configs:
        # A backend resolve_backend refused is skipped on every rank together. A step that raises is a bug
        # to report, never a skip: it propagates (peers waiting in a collective are ended by run_ranks or
        # torchrun), so the run exits non-zero instead of printing a table without that row.
        if not _all_ok(not c["reason"], device):
            c["reason"] = c["reason"] or "skipped on another rank"
            c["model"] = None
            continue
        try:
            step(c)
        except Exception as err:
            raise RuntimeError(f"{c['strategy']} / {c['backend']} / L={c['seq']}: the first step failed") from err
    live = [c for c in configs if c["model"] is not None]
    timer = _Timer(device)
    for c in live:
        c["times"] = []
    for k in range(opts["warmup"] + opts["repeats"]):
        for c in live:  # round-robin: load changes hit every configuration alike
            dist.barrier()
            with _nvtx(f"bench/{c['strategy']}/{c['backend']}/L{c['seq']}", device):
                t = timer(lambda c=c: step(c))
            if k >= opts["warmup"]:
                c["times"].append(t)
    if rank == 0 and opts["trace_dir"]:
        Path(opts["trace_dir"]).mkdir(parents=True, exist_ok=True)
    for c in live:
        c["trace"] = None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if opts["trace_dir"]:
            with torch.profiler.profile(activities=activities) as prof:
                step(c)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            if rank == 0:
                name = f"{c['strategy']}_{c['backend']}_L{c['seq']}_rank0.json".replace("/", "-")
                path = os.path.join(opts["trace_dir"], name)
                prof.export_chrome_trace(path)
                c["trace"] = path
    out = []
    for c in configs:
        row = {k: c[k] for k in ("strategy", "backend", "seq", "check")}
        if c["model"] is not None:  # the default check's own work on this input, timed alone
            x = inputs[c["seq"]]["shard" if c["sequence_split"] else "full"][0]
            row["check_alone_s"] = statistics.median(timer(lambda x=x: Fingerprinter()([x])) for _ in range(9))
        if c["model"] is None:
            row.update(status="skipped", reason=c["reason"])
        else:
            row.update(status="ok", median_s=statistics.median(c["times"]), times_s=c["times"], trace=c["trace"])
        out.append(row)
    return {"rank": rank, "rows": out}


def _merge(per_rank: list[dict], opts: dict) -> dict:
    """One record of the run: every configuration with its slowest rank's median, and each rank's."""
    results = []
    for k, row in enumerate(per_rank[0]["rows"]):
        row = dict(row)
        if row["status"] == "ok":
            # Ranks run each step in lockstep (barrier, collectives): a round takes its slowest rank's time.
            rounds = [max(t) for t in zip(*(r["rows"][k]["times_s"] for r in per_rank))]
            row.update(median_s=statistics.median(rounds), times_s=rounds)
            if row.get("trace"):
                row["ranges_found"], row["collectives_found"] = _scan_trace(row["trace"])
        results.append(row)
    device = _device()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / opts["world"]
    except (ValueError, OSError):
        mem = 0
    if device.type == "cuda":
        mem = torch.cuda.get_device_properties(device).total_memory
    return {
        "source": opts.get("json") or "bench_layer",
        "machine": common.machine(),
        "date": common.today(),
        "command": common.command_line(),
        "device": device.type,
        "world": opts["world"],
        "layers": opts["layers"],
        "batch": opts["batch"],
        "dtype": opts["dtype"],
        "dtype_bytes": torch.empty((), dtype=getattr(torch, opts["dtype"])).element_size(),
        "config": opts["config"],
        "memory_bytes_per_rank": mem,
        "repeats": opts["repeats"],
        "warmup": opts["warmup"],
        "results": results,
    }


def report(run: dict, section: str = "bench_layer") -> str:
    """The markdown section of one run: ratio to the fastest configuration per sequence length, then the
    cost model fitted to the run's naive rows (``odysseus.plan.calibrate``) with its prediction per row."""
    cpu = run["device"] == "cpu"
    rows = []
    checks = sorted({r.get("check", "default") for r in run["results"]})
    for seq in sorted({r["seq"] for r in run["results"]}):
        ok = [r for r in run["results"] if r["seq"] == seq and r["status"] == "ok"]
        best = min((r["median_s"] for r in ok), default=None)
        for r in (r for r in run["results"] if r["seq"] == seq):
            if r["status"] != "ok":
                rows.append([seq, r["strategy"], r["backend"], "skipped", "", "", textwrap.shorten(r["reason"], 110)])
                continue
            if r.get("trace"):
                missing = [n for n in expected_ranges(r["strategy"]) if n not in r["ranges_found"]]
                found = ", ".join(r["ranges_found"]) or "none"
                ranges = found + (f" (missing {', '.join(missing)})" if missing else "")
                colls = ", ".join(n for n in r["collectives_found"] if n.startswith(("c10d::", "nccl:", "gloo:")))
            else:
                ranges = colls = "not traced"
            rows.append(
                [
                    seq,
                    r["strategy"] + (f" (input check: {r['check']})" if len(checks) > 1 else ""),
                    r["backend"],
                    f"{r['median_s'] / best:.2f}",
                    f"{r['median_s'] * 1e3:.1f}",
                    ranges,
                    colls,
                ]
            )
    c = run["config"]
    unit = "ms (this machine's wall clock)" if cpu else "ms (CUDA events)"
    lines = [
        "## Layer step time (perf/bench_layer.py)" + ("" if section == "bench_layer" else f": {section}"),
        "",
        f"`{run['command']}` — {run['date']} — {run['machine']}",
        "",
        f"{run['layers']} block(s) (d={c['hidden_size']}, {c['num_heads']} heads, {c['num_kv_heads']} kv heads, "
        f"i={c['intermediate_size']}), batch {run['batch']}, {run['dtype']}, world {run['world']} on {run['device']}; "
        f"forward + backward + finalize_grads, median of {run['repeats']} after {run['warmup']} warm-up steps, "
        "slowest rank per round, configurations interleaved."
        + (" CPU: compare the ratios within this run; they are not GPU predictions." if cpu else ""),
        "",
        common.markdown_table(
            ["L", "strategy", "backend", "time / fastest", unit, "named ranges in trace", "collectives in trace"], rows
        ),
    ]
    if {"default", "off"} <= set(checks):
        lines += ["", input_check_report(run)]
    fit_rows = [r for r in run["results"] if r["status"] == "ok" and r["backend"] in ("naive", "n/a")]
    fit_rows = [r for r in fit_rows if r.get("check", "default") == "default"]
    if len([r for r in fit_rows if not Variant.parse(r["strategy"]).zero3]) >= 3:  # what calibrate fits
        lines += ["", "Cost model fitted to this run's naive rows (`odysseus.plan.calibrate`):", ""]
        lines.append(calibration_report(calibrate(run)))
    return "\n".join(lines)


def input_check_report(run: dict) -> str:
    """The default input check's cost: each configuration's step with it over the same step without it
    (measured side by side), and the check's own time as a share of the step."""
    ok = [r for r in run["results"] if r["status"] == "ok"]
    rows = []
    for r in (r for r in ok if r.get("check") == "default"):
        off = next(
            o for o in ok if o.get("check") == "off" and all(o[k] == r[k] for k in ("strategy", "backend", "seq"))
        )
        rows.append(
            [r["seq"], r["strategy"], r["backend"], f"{r['median_s'] / off['median_s']:.3f}",
             f"{r['check_alone_s'] * 1e3:.3f}", f"{100 * r['check_alone_s'] / off['median_s']:.3f}%"]
        )  # fmt: skip
    head = ["L", "strategy", "backend", "step: default check / none", "check alone, ms", "check alone / step"]
    return "Default input check against none:\n\n" + common.markdown_table(head, rows)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local-world", type=int, help="fork this many gloo ranks here instead of running under torchrun")
    p.add_argument(
        "--strategies", default="tp,tp-sp,ulysses,odysseus", help=f"any of {', '.join(v.name for v in VARIANTS)}"
    )
    p.add_argument("--backends", default="naive,pipelined", help=f"overlap backends, any of {ody_overlap.BACKENDS}")
    p.add_argument("--model", choices=sorted(MODELS), help="take the block shape from a model preset")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--seqs", default="512,2048", help="sequence lengths, e.g. 512,2048 or 16K")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=1, help="blocks in the stack")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--trace-dir",
        default=os.path.join(tempfile.gettempdir(), "odysseus-traces"),
        help="where rank 0 writes Chrome traces ('' for none)",
    )
    p.add_argument(
        "--input-checks", default="default", help=f"input checks to build each configuration with: {list(INPUT_CHECKS)}"
    )
    p.add_argument("--json", help="write the measurements here (input of odysseus.plan --calibrate)")
    p.add_argument("--results", type=Path, help="markdown file in which this run's section is rewritten")
    p.add_argument("--section", default="bench_layer", help="name of that section (one per kind of run)")
    return p.parse_args(argv)


def _options(args: argparse.Namespace) -> dict:
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for s in strategies:
        Variant.parse(s)  # names the bad one
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    checks = [c.strip() for c in args.input_checks.split(",") if c.strip()]
    if not checks or not set(checks) <= set(INPUT_CHECKS):
        raise ValueError(f"--input-checks={args.input_checks!r}: expected names from {list(INPUT_CHECKS)}")
    for b in backends:
        ody_overlap.check_backend(b)
    if args.model:
        m = get_model(args.model)
        config = dict(
            hidden_size=m.hidden_size,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            intermediate_size=m.intermediate_size,
        )
    else:
        config = dict(
            hidden_size=args.hidden,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads or args.heads,
            intermediate_size=args.ffn,
        )
    odysseus.TransformerConfig(**config)  # validates
    for name in ("batch", "layers", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} must be >= 1")
    if args.warmup < 0:
        raise ValueError(f"--warmup={args.warmup} must be >= 0")
    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    return dict(
        strategies=strategies,
        backends=backends,
        checks=checks,
        config=config,
        seqs=common.parse_ints(args.seqs, "seqs"),
        batch=args.batch,
        layers=args.layers,
        dtype=dtype,
        warmup=args.warmup,
        repeats=args.repeats,
        trace_dir=args.trace_dir,
        json=args.json,
    )


def _finish(per_rank: list[dict], opts: dict, args: argparse.Namespace) -> dict:
    run = _merge(per_rank, opts)
    text = report(run, args.section)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(run, indent=1))
        print(f"\nmeasurements: {args.json}")
    if args.results:
        common.write_section(args.section, text, args.results)
    return run


def main(argv: list[str] | None = None) -> dict | None:
    args = _parse(argv)
    opts = _options(args)
    if args.local_world is not None:
        if args.local_world < 1:
            raise ValueError(f"--local-world={args.local_world} must be >= 1")
        opts["world"] = args.local_world
        per_rank = run_ranks(args.local_world, bench_rank, opts, timeout=3600)
        return _finish(per_rank, opts, args)
    if "RANK" not in os.environ:
        raise SystemExit(
            "run under torchrun (torchrun --nproc-per-node N perf/bench_layer.py ...) or pass --local-world N"
        )
    device = _device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        opts["world"] = dist.get_world_size()
        mine = bench_rank(dist.get_rank(), opts["world"], opts)
        gathered = [None] * opts["world"]
        dist.all_gather_object(gathered, mine)
        return _finish(gathered, opts, args) if dist.get_rank() == 0 else None
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
