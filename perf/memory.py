"""Memory per rank per block: activations saved for backward, the peak of a training step, and weights.

    python perf/memory.py                          # N = 2,4,8; L = 4K,16K,64K; Llama-2-7B shape, bf16
    python perf/memory.py --quick --out /tmp/mem   # smaller check, for tests

As in ``perf/comm_volume.py``, small shapes are measured first and the closed forms of ``odysseus.plan``
are extrapolated only once they match, on every rank:

- activations: ``odysseus.profiling.SavedActivations`` over one bf16 forward, exactly equal to
  ``odysseus.plan.saved_activation_bytes``, for both ``save_input`` modes;
- the peak: ``odysseus.training.memtrack.MemoryTracker`` (every tensor storage allocated and freed, custom ops
  followed inside) over forward + backward + ``finalize_grads``, beyond the weights, the input and the
  output's gradient, within 5% of ``odysseus.plan.block_peak``, for every strategy, ZeRO-3 on and off,
  ``save_input="gathered"`` and ``"shard"``, on the CPU backends ``pipelined`` and ``naive``;
- parameters, gradients (after backward and ``finalize_grads``) and AdamW's two moment buffers (after
  one ``step()``), exactly equal to ``odysseus.plan.parameter_bytes``; for the ZeRO-3 variants FSDP2's
  sharded parameters count their padded storage, gradients and moments their unpadded shard.

The same checks run on ``("ring", "sp")`` meshes (:data:`RING_LAYOUTS`; ring attention, ``odysseus.plan.ring``) for
every strategy that splits the sequence, without ZeRO-3, on :data:`RING_SHAPES`: odd chunks, batch 2, GQA
expanded per block, and a ring rank's sequence past the ``512 x 512`` score tile.

Shapes cover even and uneven sequences, batch 2, several widths and GQA (with expanded kv heads at N = 8),
and one longer sequence where activations outweigh the weights, so the forms are checked in every
variable they extrapolate in. The ZeRO-3 variants' saved activations are their base strategy's (FSDP2
frees the gathered weights after forward, which ``SavedActivations`` cannot see); their peaks are measured.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import common
import torch

import odysseus
from odysseus import finalize_grads, shard_sequence
from odysseus.launch import run_ranks
from odysseus.plan import (
    MODELS,
    Case,
    block_peak,
    get_model,
    parameter_bytes,
    predict,
    saved_activation_bytes,
    symm_workspace_bytes,
)
from odysseus.plan.overlap_memory import ring_slot_bytes
from odysseus.reference import TransformerBlock, init_weights
from odysseus.strategies.registry import VARIANTS
from odysseus.training.memtrack import step_memory

MODES = ("gathered", "shard")
BACKENDS = ("pipelined", "naive")
"""The CPU backends measured (symm's terms come from its code: ``plan.overlap_memory.symm_workspace_bytes``)."""
TOLERANCE = 0.05
"""Largest relative difference between a measured peak and ``block_peak``."""
LONG_SHAPE = (dict(hidden_size=64, num_heads=8, num_kv_heads=4, intermediate_size=172), 1, 253)
"""A sequence long enough that activations, not weights, set the peak at every N."""
RING_LAYOUTS = ((2, 1), (2, 2))
"""(ring, sp) sizes of the ``("ring", "sp")`` meshes measured: pure ring attention, and the ring under sp."""
RING_SHAPES = [
    (dict(hidden_size=96, num_heads=6, num_kv_heads=2, intermediate_size=160), 1, 60),
    (dict(hidden_size=64, num_heads=8, num_kv_heads=4, intermediate_size=172), 2, 44),
    (dict(hidden_size=64, num_heads=8, num_kv_heads=4, intermediate_size=172), 1, 2084),
]
"""Sequences of ``2R`` equal odd chunks (15 and 11 tokens; 521, so a ring rank's 1042 tokens span three tiles of
scores), batch 2, kv heads shared by the query heads of a rank."""


def _local_bytes(t: torch.Tensor, padded: bool = False) -> int:
    """Bytes of this rank's part of ``t``; for an FSDP2 DTensor its shard (``padded``: its whole buffer)."""
    local = getattr(t, "_local_tensor", t)
    if padded and local is not t:
        return local.untyped_storage().nbytes()
    return local.numel() * local.element_size()


def combos() -> list[tuple]:
    """(variant, save_input, backend) measured: every mode and CPU backend where the strategy runs the
    overlap ops, one run otherwise (neither applies)."""
    return [
        (v, mode, backend)
        for v in VARIANTS
        for mode in MODES
        for backend in BACKENDS
        if v.spec.overlapped or (mode, backend) == (MODES[0], BACKENDS[0])
    ]


def ring_combos() -> list[tuple]:
    """:func:`combos` of the strategies a ring runs under (those that split the sequence), without ZeRO-3."""
    return [(v, mode, backend) for v, mode, backend in combos() if v.spec.sequence_split and not v.zero3]


def _measure(rank: int, world: int, shapes: list, ring: int = 1) -> list[dict]:
    mesh = None
    if ring > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (ring, world // ring), mesh_dim_names=("ring", "sp"))
    out = []
    for k, (cfg_kw, B, L) in enumerate(shapes):
        ref = init_weights(TransformerBlock(odysseus.TransformerConfig(**cfg_kw))).to(torch.bfloat16)
        g = torch.Generator().manual_seed(k)
        x = torch.randn(B, L, ref.config.hidden_size, generator=g, dtype=torch.bfloat16)
        for v, mode, backend in combos() if ring == 1 else ring_combos():
            par = odysseus.parallelize(ref, v.spec.name, mesh, backend=backend, save_input=mode)
            if v.zero3:
                par = odysseus.zero3(par)
            # Its own storage, as a layer input in a model is (a shard_sequence view would hold the whole x).
            xin = (shard_sequence(x, mesh) if v.spec.sequence_split else x).detach().clone().requires_grad_()
            dy = torch.randn(xin.shape, generator=g, dtype=xin.dtype)
            par(xin).backward(dy)  # first calls initialise lazily (FSDP2, length exchanges): not measured
            finalize_grads(par)
            par.zero_grad(set_to_none=True)
            xin.grad = None
            m = step_memory(par, xin, dy, finalize_grads)
            opt = torch.optim.AdamW(par.parameters(), lr=1e-3)
            opt.step()
            moments = sum(_local_bytes(t) for st in opt.state.values() for n, t in st.items() if n != "step")
            out.append(
                dict(
                    strategy=v.name, mode=mode, backend=backend, shape=k, peak=m.peak, peak_op=m.peak_op,
                    saved=None if v.zero3 else m.saved,  # FSDP2's gathered weights look saved, then are freed
                    params=sum(_local_bytes(p, padded=True) for p in par.parameters()),
                    grads=sum(_local_bytes(p.grad) for p in par.parameters()), adamw=moments,
                )
            )  # fmt: skip
    return out


def verify(worlds: list[int], shapes: list, ring_layouts=(), ring_shapes: list | None = None) -> tuple[int, list[dict]]:
    """Measure every strategy, mode and CPU backend at every world and shape, and on every ``(ring, sp)`` layout
    at every ring shape. Raise on any difference in the exact forms or a peak off by more than ``TOLERANCE``;
    return the cases checked and one row per peak (``ring``: 1, or R on a ring layout)."""
    runs = [(w, 1, shapes) for w in worlds] + [(R * S, R, ring_shapes) for R, S in ring_layouts]
    checked, rows = 0, []
    with common.norm_chunks(common.NORM_CHUNK_ROWS):  # the chunked RMSNorm backward, as long shards run it
        for world, R, run_shapes in runs:
            S = world // R
            for rank, cases in enumerate(run_ranks(world, _measure, run_shapes, R, timeout=1800)):
                for got in cases:
                    cfg_kw, B, L = run_shapes[got["shape"]]
                    s, mode = got["strategy"], got["mode"]
                    # sp innermost: this rank's sp rank; its ring rank holds L/R tokens
                    cfg = odysseus.TransformerConfig(**cfg_kw)
                    case = Case(s, cfg, B, L // R, S, rank % S, 2, save_input=mode, ring=R)
                    want = parameter_bytes(case)
                    if got["saved"] is not None:
                        want["saved"] = saved_activation_bytes(case)
                    measured = {k: got[k] for k in want}
                    mesh = f"N={world}" if R == 1 else f"ring {R} x sp {S}"
                    where = f"{s} at {mesh}, rank {rank}, {mode}/{got['backend']}, shape {cfg_kw}, B={B}, L={L}"
                    if measured != want:
                        raise AssertionError(f"{where}: measured {measured}, closed form {want}")
                    peak = block_peak(case, got["backend"])
                    dev = common.peak_deviation(where, got["peak"], peak.bytes, peak.moment, got["peak_op"], TOLERANCE)
                    rows.append(
                        dict(got, world=world, rank=rank, ring=R, model=peak.bytes, moment=peak.moment, dev=dev)
                    )
                    checked += 1
    return checked, rows


def deviation_table(rows: list[dict]) -> str:
    """Per strategy and save_input (and ``ring x sp`` on ring layouts): cases, the largest and the mean
    |deviation|, the moments the peak fell at."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        layout = f"{r['ring']} x {r['world'] // r['ring']}" if r["ring"] > 1 else ""
        groups[(r["strategy"], r["mode"], layout)].append(r)
    ring = any(layout for _, _, layout in groups)
    names = [v.name for v in VARIANTS]
    out = []
    for (s, mode, layout), rs in sorted(groups.items(), key=lambda kv: (names.index(kv[0][0]), kv[0][1:])):
        devs = [abs(r["dev"]) for r in rs]
        moments = sorted({r["moment"] for r in rs})
        stats = [len(rs), f"{max(devs):.2%}", f"{sum(devs) / len(devs):.3%}", ", ".join(moments)]
        out.append([s, mode] + ([layout] if ring else []) + stats)
    headers = ["strategy", "save_input"] + (["ring x sp"] if ring else [])
    headers += ["cases", "max deviation", "mean deviation", "peak at (closed form)"]
    return common.markdown_table(headers, out)


def table(model: str, worlds: list[int], seqs: list[int], backend: str = "symm") -> str:
    """Rows (strategy, N, save_input): saved activations per L and the peak of one block at the longest L
    (GiB), params/grads/AdamW (MiB), the model's blocks at the longest L; per block on rank 0."""
    m = get_model(model)
    cfg = m.config()
    gib, mib = 1 << 30, 1 << 20
    headers = ["strategy", "N", "save_input"] + [f"saved L={s // 1024}K (GiB)" for s in seqs]
    headers += [f"block peak L={seqs[-1] // 1024}K (GiB)", "params (MiB)", "grads (MiB)", "AdamW 2 states (MiB)"]
    headers += [f"{m.num_layers} blocks saved + weights at L={seqs[-1] // 1024}K (GiB)"]
    rows = []
    for world in worlds:
        for v in VARIANTS:
            for mode in MODES if v.spec.overlapped else MODES[:1]:
                acts = [saved_activation_bytes(Case(v, cfg, 1, seq, world, 0, 2, mode)) for seq in seqs]
                case = Case(v, cfg, 1, seqs[-1], world, 0, 2, mode)
                pb, peak = parameter_bytes(case), block_peak(case, backend).bytes
                row = [v.name, world, mode if v.spec.overlapped else "-"] + [f"{a / gib:.2f}" for a in acts]
                row += [f"{peak / gib:.2f}", f"{pb['params'] / mib:,.1f}", f"{pb['grads'] / mib:,.1f}"]
                row += [f"{pb['adamw'] / mib:,.1f}", f"{m.num_layers * (acts[-1] + sum(pb.values())) / gib:,.1f}"]
                rows.append(row)
    return common.markdown_table(headers, rows)


def done_criteria(model: str = "llama2-7b", seq: int = 65536, world: int = 8) -> str:
    """Issue 13's numbers for one block of ``model`` at ``seq`` tokens over ``world`` ranks, bf16."""
    cfg, gib = get_model(model).config(), 1 << 30
    lines = [f"Per block of {model} at L = {seq // 1024}K, N = {world}, bf16, rank 0:", ""]
    rows = []
    for name in ("tp-sp", "odysseus", "odysseus+zero3"):
        g, s = (Case(name, cfg, 1, seq, world, 0, 2, mode) for mode in MODES)
        pg, ps = block_peak(g, "symm"), block_peak(s, "symm")
        rows.append(
            [name, f"{saved_activation_bytes(g) / gib:.2f}", f"{saved_activation_bytes(s) / gib:.2f}",
             f"{pg.bytes / gib:.2f} ({pg.moment})", f"{ps.bytes / gib:.2f} ({ps.moment})"]
        )  # fmt: skip
    headers = ["strategy", "saved, gathered (GiB)", "saved, shard (GiB)", "peak, gathered", "peak, shard"]
    lines.append(common.markdown_table(headers, rows))
    case = Case("tp-sp", cfg, 1, seq, world, 0, 2, "shard")
    full = seq * cfg.hidden_size * 2
    slots = ring_slot_bytes(case, cfg.hidden_size)
    lines += [
        "",
        f'- Transient of one all-gather⊗GEMM with `save_input="shard"` (the default ring: 2 slots of '
        f"{case.piece_tokens()} tokens): {slots / (1 << 20):.0f} MiB = {slots / full:.2%} of L×K "
        f"({full / (1 << 20):.0f} MiB); pipelined adds a copy of this rank's shard only when B > 1. "
        f'With `"gathered"` the gathered input (100% of L×K) is kept.',
        f"- symm's persistent workspaces (once per process group, shared by every block): "
        f"{symm_workspace_bytes(case) / (1 << 20):.0f} MiB (the all-gather stage, L_r×K, and the "
        "reduce-scatter receive slots, N×L_r×K).",
    ]
    return "\n".join(lines)


def fit_table(model: str = "llama2-7b", seq: int = 65536, gpus: int = 8, hardware: str = "a100-nvlink") -> str:
    """``python -m odysseus.plan ... --recompute never`` in both ``save_input`` modes."""
    rows = []
    for mode in MODES:
        for p in predict(model, seq, gpus, hardware, recompute="never", save_input=mode):
            m = p.memory
            gb = [(m["params"] + m["grads"] + m["optimizer"]), m["activations"], m["transient"], m["total"]]
            rows.append([mode, p.strategy, "yes" if p.fits else "NO", *(f"{b / 1e9:.1f}" for b in gb)])
            rows[-1].append(f"{p.step_s * 1e3:.0f}")
    headers = ["save_input", "strategy", "fits", "params+grads+optim GB", "activations GB", "transient GB"]
    return common.markdown_table(headers + ["peak GB", "step ms"], rows)


def plot(model: str, worlds: list[int], rows: list[dict], path: Path) -> None:
    """Measured against closed-form peaks; saved activations and block peaks against L at the largest N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = get_model(model).config()
    seqs = [1024 * 2**k for k in range(0, 8)]
    world = worlds[-1]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ax = axes[0]
    for v in VARIANTS:
        got = [(r["peak"], r["model"]) for r in rows if r["strategy"] == v.name]
        if got:
            ax.scatter(*zip(*got), s=8, label=v.name, color=common.style(v)["color"], marker=common.style(v)["marker"])
    lo, hi = min(r["peak"] for r in rows), max(r["peak"] for r in rows)
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured peak (bytes, MemoryTracker)")
    ax.set_ylabel("closed form (bytes, plan.block_peak)")
    ax.set_title(f"{len(rows)} small-shape cases, worst {max(abs(r['dev']) for r in rows):.1%}", fontsize=9)
    ax.legend(fontsize=6)
    for ax, what in zip(axes[1:], ("saved", "peak")):
        for v in (v for v in VARIANTS if not v.zero3 or what == "peak"):
            for mode in MODES if v.spec.overlapped else MODES[:1]:
                cases = [Case(v, cfg, 1, L, world, 0, 2, mode) for L in seqs]
                ys = [saved_activation_bytes(c) if what == "saved" else block_peak(c, "symm").bytes for c in cases]
                style = common.style(v)
                if mode == "shard":  # same colour; dash-dot, crosses (triangles down for ZeRO-3)
                    style = dict(style, ls="-.", marker="v" if v.zero3 else "x", lw=1.2)
                ax.plot(
                    seqs, [y / (1 << 30) for y in ys], label=f"{v.name} {mode if v.spec.overlapped else ''}", **style
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_ylabel("GiB per rank per block")
        title = "saved activations" if what == "saved" else "peak of one block (symm, with its finalize_grads)"
        ax.set_title(f"{title}, N = {world}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{model}, bf16, batch 1: closed forms checked against SavedActivations and MemoryTracker", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    args = common.sweep_args(__doc__, argv, MODELS)
    worlds, seqs, check_worlds = args.worlds, args.seqs, args.check_worlds
    shapes = args.shapes if args.quick else [*args.shapes, LONG_SHAPE]
    ring_layouts, ring_shapes = (RING_LAYOUTS[1:], RING_SHAPES[:1]) if args.quick else (RING_LAYOUTS, RING_SHAPES)
    checked, rows = verify(check_worlds, shapes, ring_layouts, ring_shapes)
    ring_rows = [r for r in rows if r["ring"] > 1]
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "memory.png"
    plot(args.model, worlds, rows, png)
    cfg = get_model(args.model).config()
    body = "\n".join(
        [
            "## Memory per rank (perf/memory.py)",
            "",
            f"`{common.command_line()}` — {common.today()} — {common.machine()}",
            "",
            f"Checked first: {checked} (strategy, save_input, CPU backend, shape, rank) cases at N = "
            f"{check_worlds} on {len(shapes)} small bf16 shapes (RMSNorm forward and backward in chunks of "
            f"{common.NORM_CHUNK_ROWS} rows, as long shards run it). Saved activations (SavedActivations), "
            "parameter, gradient and AdamW-state storage matched the closed forms exactly; the peak of forward + "
            "backward + `finalize_grads` (`odysseus.training.memtrack.MemoryTracker`, beyond the weights, the "
            "input and "
            "the output's gradient) matched `odysseus.plan.block_peak` within "
            f"{max(abs(r['dev']) for r in rows):.2%} (tolerance {TOLERANCE:.0%}):",
            "",
            deviation_table(rows),
            "",
            f'Ring rows (`ring x sp` set): {len(ring_rows)} of these cases on `("ring", "sp")` meshes '
            f"{', '.join(f'({R}, {S})' for R, S in ring_layouts)} at {len(ring_shapes)} shapes "
            f"(B, L = {', '.join(f'{B}, {L}' for _, B, L in ring_shapes)}; `Case(..., seq=L/R, world=S, ring=R)`), "
            f"worst {max(abs(r['dev']) for r in ring_rows):.2%}. What a ring rank holds in attention "
            "(`odysseus.plan.ring.ring_transients`) is its own L/R tokens' K/V blocks (two in flight), fp32 "
            "accumulators and K/V/dK/dV expanded to its query heads, all O(L/(R·S)) per rank (sp splits the "
            "heads), score tiles of at most 512 x 512 per head, and one term that is not: the causal mask of "
            "the diagonal block, one byte per query-key pair of the ring rank, (L/R)^2 bytes.",
            "",
            f"Extrapolated per block of {args.model} (d={cfg.hidden_size}, {cfg.num_heads} heads, "
            f"{cfg.num_kv_heads} kv heads, i={cfg.intermediate_size}), batch 1, bf16, rank 0. Block peaks on the "
            "GPU backend, symm (its terms from its code; its persistent workspaces are not in the block: see "
            "below). AdamW moments in the parameter dtype, as torch.optim.AdamW keeps them (mixed precision "
            "adds fp32 master weights and moments, which `odysseus.plan` counts). ZeRO-3 rows: "
            "`odysseus.zero3(par)`; their parameters include FSDP2's padding. The last column: saved "
            "activations and weights of every block, without recomputation, embeddings or logits.",
            "",
            table(args.model, worlds, seqs),
            "",
            done_criteria(args.model, seqs[-1], worlds[-1]),
            "",
            f"`python -m odysseus.plan --model {args.model} --seq {seqs[-1]} --gpus {worlds[-1]} --hardware "
            "a100-nvlink --recompute never --save-input {gathered,shard}` (whole model, per rank; 72 GB usable):",
            "",
            fit_table(args.model, seqs[-1], worlds[-1]),
            "",
            f"Plot: [{png.name}]({png.name})",
        ]
    )
    print(body)
    common.write_section("memory", body, args.results)
    return body


if __name__ == "__main__":
    main()
