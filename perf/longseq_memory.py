"""Long-sequence memory: the planner's terms for layer checkpointing, host offload, the tiled FFN and the chunked
loss, measured on CPU at small shapes, then the longest sequence per strategy, GPU count and option.

    python perf/longseq_memory.py                  # check worlds 1-3, write the max-seq table to RESULTS.md
    python perf/longseq_memory.py --quick --results /tmp/R.md   # worlds 1-2, two layers (for tests)

What is measured: a stack of ``layers`` blocks (``odysseus.parallelize``), the final norm and the LM head +
loss (``odysseus.integrations.loss.lm_head_loss`` chunked, or ``causal_lm_loss`` on full logits), forward and
backward, by ``odysseus.training.memtrack.MemoryTracker``, beyond the weights and the stack's input, as a model's
step sees it. Offload is replaced by a stand-in of ``torch.autograd.graph.save_on_cpu`` whose host copies the
tracker does not see (their bytes are counted apart, as host memory) and whose copies back are new storages,
as on a GPU. Both must equal :func:`odysseus.plan.longseq.stack_peak` within ``TOLERANCE`` (device) and
exactly (host), on every rank, for every option set and strategy.
"""

from __future__ import annotations

import gc
import itertools
from collections import defaultdict
from pathlib import Path

import common
import torch
from torch.utils._python_dispatch import _disable_current_modes

import odysseus
from odysseus import shard_sequence
from odysseus.integrations.hf import causal_lm_loss, lm_head_loss
from odysseus.launch import run_ranks
from odysseus.ops.rmsnorm import FusedRMSNorm
from odysseus.plan import Case, LongSeq, max_seq, stack_peak
from odysseus.plan.max_seq import FFN_TILE, LOSS_CHUNK
from odysseus.reference import TransformerBlock, init_weights
from odysseus.strategies.registry import VARIANTS
from odysseus.training.memtrack import MemoryTracker, settled_collectives

TOLERANCE = 0.05
"""Largest relative difference between a measured device peak and the closed form."""
OPTIONS = [
    LongSeq(),
    LongSeq(checkpoint=True),
    LongSeq(checkpoint=True, offload=True),
    LongSeq(ffn_tile=7),
    LongSeq(loss_chunk=16),
    LongSeq(checkpoint=True, ffn_tile=7, loss_chunk=16),
    LongSeq(checkpoint=True, offload=True, ffn_tile=7, loss_chunk=16),
]
"""The option sets measured (tiles and chunks that divide no shard evenly)."""
SHAPES = [(dict(hidden_size=96, num_heads=6, num_kv_heads=2, intermediate_size=160), 2, 61, 251, 3)]
"""(block config, batch, sequence, vocabulary, layers): odd sizes, a kv head shared at N = 3."""
QUICK_SHAPES = [(SHAPES[0][0], 1, 61, 251, 2)]


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """A stand-in for ``save_on_cpu`` on CPU: each packed tensor is copied where the tracker cannot see it (host
    memory, counted in ``HostOffload.live``) and copied back into a new storage the tracker sees (on a GPU the
    copy back is a new device tensor; ``save_on_cpu`` on CPU would hand back the host tensor itself)."""

    live = 0
    peak = 0

    def __init__(self, pin_memory: bool = False, device_type: str = "cuda") -> None:
        def pack(t: torch.Tensor):
            with _disable_current_modes():
                host = t.detach().clone()
            cls = HostOffload
            cls.live += host.numel() * host.element_size()
            cls.peak = max(cls.peak, cls.live)
            return _HostCopy(host)

        def unpack(held):
            return held.host.clone()

        super().__init__(pack, unpack)


class _HostCopy:
    """A host copy whose bytes leave ``HostOffload.live`` when autograd drops it."""

    def __init__(self, host: torch.Tensor) -> None:
        self.host = host

    def __del__(self) -> None:
        HostOffload.live -= self.host.numel() * self.host.element_size()


def _stack(ref: TransformerBlock, strategy: str, layers: int, opt: LongSeq, vocab: int) -> tuple:
    blocks = [
        odysseus.parallelize(
            ref, strategy, backend="pipelined", checkpoint=opt.checkpoint, offload=opt.offload, ffn_tile=opt.ffn_tile
        )
        for _ in range(layers)
    ]
    g = torch.Generator().manual_seed(1)
    norm = FusedRMSNorm(ref.config.hidden_size, dtype=torch.bfloat16)
    head = torch.nn.Linear(ref.config.hidden_size, vocab, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.1)
    return blocks, norm, head


def _step(blocks, norm, head, x, labels, chunk) -> torch.Tensor:
    h = x
    for b in blocks:
        h = b(h)
    h = norm(h)
    if chunk is None:
        return causal_lm_loss(head(h), labels)
    return lm_head_loss(h, head, labels, chunk=chunk, impl="chunked")


def _measure(rank: int, world: int, shapes: list, options: list[LongSeq]) -> list[dict]:
    import odysseus.ops.recompute as rc

    rc.torch.autograd.graph.save_on_cpu = HostOffload  # this forked rank only
    out = []
    for k, (cfg_kw, B, L, V, layers) in enumerate(shapes):
        ref = init_weights(TransformerBlock(odysseus.TransformerConfig(**cfg_kw))).to(torch.bfloat16)
        g = torch.Generator().manual_seed(k)
        x = torch.randn(B, L, ref.config.hidden_size, generator=g, dtype=torch.bfloat16)
        labels = torch.randint(0, V, (B, L), generator=g)
        for v, opt in itertools.product([v for v in VARIANTS if not v.zero3], options):
            blocks, norm, head = _stack(ref, v.spec.name, layers, opt, V)
            xin = (shard_sequence(x) if v.spec.sequence_split else x).detach().clone().requires_grad_()
            params = [p for m in (*blocks, norm, head) for p in m.parameters()]
            _step(blocks, norm, head, xin, labels, opt.loss_chunk).backward()  # lazy initialisation: not measured
            for p in [*params, xin]:
                p.grad = None
            gc.collect()
            enabled = gc.isenabled()
            gc.disable()  # a cycle collection inside the step would free memory at an arbitrary moment
            HostOffload.live = HostOffload.peak = 0
            try:
                with settled_collectives(), MemoryTracker() as mem:
                    _step(blocks, norm, head, xin, labels, opt.loss_chunk).backward()
            finally:
                if enabled:
                    gc.enable()
            out.append(dict(strategy=v.name, options=opt, shape=k, peak=mem.peak_bytes, op=mem.peak_op,
                            host=HostOffload.peak))  # fmt: skip
    return out


def verify(worlds: list[int], shapes: list, options: list[LongSeq] = OPTIONS) -> tuple[int, list[dict]]:
    """Measure every option set and strategy at every world and shape; raise on a host term that differs or a
    device peak off by more than ``TOLERANCE``; return the cases checked and one row per case."""
    rows = []
    with common.norm_chunks(common.NORM_CHUNK_ROWS):
        for world in worlds:
            rows += _verify_world(world, shapes, options)
    return len(rows), rows


def _verify_world(world: int, shapes: list, options: list[LongSeq]) -> list[dict]:
    rows = []
    for rank, got in enumerate(run_ranks(world, _measure, shapes, options, timeout=1800)):
        for r in got:
            cfg_kw, B, L, V, layers = shapes[r["shape"]]
            case = Case(r["strategy"], odysseus.TransformerConfig(**cfg_kw), B, L, world, rank, 2)
            want = stack_peak(case, layers, V, r["options"], "pipelined")
            where = f"{r['strategy']} at N={world}, rank {rank}, {r['options'].label()}, L={L}, B={B}"
            if want.host != r["host"]:
                raise AssertionError(f"{where}: host bytes {r['host']}, closed form {want.host}")
            detail = f"\n{want.moments}"
            dev = common.peak_deviation(where, r["peak"], want.bytes, want.moment, r["op"], TOLERANCE, detail)
            rows.append(dict(r, world=world, rank=rank, model=want.bytes, moment=want.moment, dev=dev))
    return rows


def deviation_table(rows: list[dict]) -> str:
    """Per option set: cases, the largest and mean |deviation|, the moments the peak fell at."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["options"].label()].append(r)
    out = []
    for label, rs in groups.items():
        devs = [abs(r["dev"]) for r in rs]
        moments = ", ".join(sorted({r["moment"] for r in rs}))
        out.append([label, len(rs), f"{max(devs):.2%}", f"{sum(devs) / len(devs):.3%}", moments])
    return common.markdown_table(["options", "cases", "max deviation", "mean deviation", "peak at"], out)


TABLE_OPTIONS = {
    "none": LongSeq(),
    "checkpoint": LongSeq(checkpoint=True),
    "+ffn_tile+chunked loss": LongSeq(checkpoint=True, ffn_tile=FFN_TILE, loss_chunk=LOSS_CHUNK),
    "+offload": LongSeq(checkpoint=True, offload=True, ffn_tile=FFN_TILE, loss_chunk=LOSS_CHUNK),
}


def max_seq_table(model: str, hardware: str, gpus: list[int]) -> str:
    """Planner predictions: the longest sequence per strategy, GPU count and option set (``save_input`` the
    better of both modes)."""
    rows = []
    for n in gpus:
        found = {label: {m.strategy: m for m in max_seq(model, n, hardware, options=[opt])}
                 for label, opt in TABLE_OPTIONS.items()}  # fmt: skip
        for v in VARIANTS:
            cells = [found[label][v.name].seq for label in TABLE_OPTIONS]
            rows.append([v.name, n, *(f"{c / 1e6:.3f}M" if c else "-" for c in cells)])
    return common.markdown_table(["strategy", "GPUs", *TABLE_OPTIONS], rows)


def main(argv: list[str] | None = None) -> str:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="worlds 1-2, one shape, fewer layers (for tests)")
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--hardware", default="h100-nvlink")
    p.add_argument("--results", type=Path, default=common.RESULTS, help="markdown file to update")
    args = p.parse_args(argv)
    worlds = [1, 2] if args.quick else [1, 2, 3]
    checked, rows = verify(worlds, QUICK_SHAPES if args.quick else SHAPES)
    worst = max(abs(r["dev"]) for r in rows)
    best = {off: max_seq(args.model, 8, args.hardware, offload=off)[0] for off in (True, False)}
    body = "\n".join(
        [
            "## Long sequences: max sequence per strategy (perf/longseq_memory.py)",
            "",
            f"`{common.command_line()}` — {common.today()} — {common.machine()}",
            "",
            f"Checked first: {checked} (strategy, options, rank) cases at N = {worlds}, bf16, a stack of blocks + "
            "final norm + LM head and loss (odd shapes: hidden 96, 6 heads, 2 kv heads, 61 tokens, vocabulary 251; "
            f"RMSNorm forward and backward in chunks of {common.NORM_CHUNK_ROWS} rows, as long shards run it). "
            "The device peak measured by `odysseus.training.memtrack.MemoryTracker` matched "
            "`odysseus.plan.stack_peak` within "
            f"{worst:.2%} (tolerance {TOLERANCE:.0%}); offloaded bytes (host) matched exactly:",
            "",
            deviation_table(rows),
            "",
            f"**Planner predictions, not GPU measurements** (memory terms CPU-checked as above): the longest "
            f"sequence (tokens, batch 1) per strategy, GPU count and option set for {args.model} on "
            f"{args.hardware}, backend symm. Each column adds to the one before: layer checkpointing, then the tiled "
            f"FFN ({FFN_TILE} tokens) and the chunked loss ({LOSS_CHUNK} tokens), then offload of the kept layer "
            "inputs to host memory. `python -m odysseus.plan --model llama3-8b --gpus 8 --max-seq` gives "
            f"{best[True].seq:,} tokens ({best[True].strategy}) with offload and {best[False].seq:,} "
            f"({best[False].strategy}) without; binding at the next length: {best[True].binding}.",
            "",
            max_seq_table(args.model, args.hardware, [1, 2, 4, 8]),
        ]
    )
    print(body)
    common.write_section("longseq", body, args.results)
    return body


if __name__ == "__main__":
    main()
