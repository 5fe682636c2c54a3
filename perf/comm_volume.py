"""Bytes each rank receives per block (forward + backward + gradient sync), per strategy, world and length.

    python perf/comm_volume.py                         # N = 2,4,8; L = 4K,16K,64K; Llama-2-7B shape, bf16
    python perf/comm_volume.py --quick --out /tmp/cv   # smaller check, for tests

Bytes do not depend on values, so the full-size numbers come from the closed forms, but only after the
closed forms were checked here, exactly and on every rank, against what the real modules send:

1. Measure. At world N (forked gloo ranks) and several small bf16 shapes (even and uneven sequences,
   multi-head and GQA), every strategy runs one forward + backward + ``finalize_grads`` inside a
   ``CommLedger``. The ZeRO-3 variants (``odysseus.zero3``, FSDP2) run too; the ledger does not see
   FSDP's collectives, so ``torch.distributed``'s all-gather/reduce-scatter functions are wrapped while
   they run and the calls made from ``torch.distributed.fsdp`` are counted the way the ledger counts
   (all-gather: the other ranks' shards; reduce-scatter: the others' contributions to this rank's shard).
2. Check. Each rank's records must equal ``odysseus.plan.expected_records`` (library collectives),
   ``odysseus.plan.zero3_records`` (FSDP2's, with its padding) and the strategy's ``length_exchanges``
   (``odysseus.strategies.registry``); any difference raises before anything is extrapolated.
3. Extrapolate the checked closed forms to the model's shape and print/write the table and the plot.
"""

from __future__ import annotations

import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import common
import torch
import torch.distributed as dist

import odysseus
from odysseus import CommLedger, finalize_grads, shard_sequence
from odysseus.comm.ledger import current_phase
from odysseus.comm.mesh import resolve_mesh
from odysseus.launch import run_ranks
from odysseus.plan import MODELS, Case, expected_records, get_model, strategy_records, zero3_records
from odysseus.plan.forms import ring_collectives, ring_tokens_per_rank
from odysseus.reference import TransformerBlock, init_weights
from odysseus.strategies.registry import VARIANTS, Variant

ZERO3_MODES = ("default", "keep")
"""``odysseus.zero3(par)`` as is (ZeRO-3 proper: parameters freed after forward, gathered again in backward)
and with ``reshard_after_forward=False`` (weights kept gathered from forward to backward: no re-gather)."""

_WRAPPED = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor")


def _arg(args: tuple, kwargs: dict, pos: int, names: tuple[str, ...]) -> torch.Tensor:
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return args[pos]


@contextmanager
def fsdp_collectives(records: list[tuple[str, str, str, int]]):
    """Append (phase, op, category, bytes received) for each all-gather/reduce-scatter FSDP issues.

    Only calls whose caller lives in ``torch.distributed.fsdp`` count, so the library's own collectives
    (which the ledger records) are not counted twice. Wrapping is re-entrant safe: a function that calls
    another wrapped one is counted once, at the outer call.
    """
    originals = {name: getattr(dist, name) for name in _WRAPPED if hasattr(dist, name)}
    depth = [0]

    def wrap(name, fn):
        def counted(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if depth[0] == 0 and caller.startswith("torch.distributed.fsdp"):
                out = _arg(args, kwargs, 0, ("output", "output_tensor"))
                inp = _arg(args, kwargs, 1, ("input", "input_tensor"))
                e = out.element_size()
                if name.startswith("all_gather"):
                    records.append((current_phase(), "all_gather", "weight", (out.numel() - inp.numel()) * e))
                else:
                    world = inp.numel() // out.numel()
                    records.append((current_phase(), "reduce_scatter", "gradient", (world - 1) * out.numel() * e))
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield records
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _cases(shapes: list) -> list[tuple[Variant, str | None, int]]:
    """(strategy, zero3 mode or None, shape index) for every measurement."""
    out = []
    for k in range(len(shapes)):
        for v in VARIANTS:
            for mode in ZERO3_MODES if v.zero3 else (None,):
                out.append((v, mode, k))
    return out


def _measure(rank: int, world: int, shapes: list) -> list[dict]:
    """On one rank: the ledger's and FSDP's records of every case."""
    got = []
    for v, mode, k in _cases(shapes):
        cfg_kw, B, L = shapes[k]
        ref = init_weights(TransformerBlock(odysseus.TransformerConfig(**cfg_kw))).to(torch.bfloat16)
        par = odysseus.parallelize(ref, v.spec.name)
        if mode is not None:
            par = odysseus.zero3(par, **({"reshard_after_forward": False} if mode == "keep" else {}))
        x = torch.randn(B, L, ref.config.hidden_size, generator=torch.Generator().manual_seed(k), dtype=torch.bfloat16)
        x = (shard_sequence(x) if v.spec.sequence_split else x).requires_grad_()
        fsdp: list = []
        with CommLedger() as ledger, fsdp_collectives(fsdp):
            par(x).float().square().sum().backward()
            finalize_grads(par)
        library = [(r.phase, r.op, r.category, r.bytes_received) for r in ledger.records if r.category != "metadata"]
        metadata = [r for r in ledger.records if r.category == "metadata"]
        got.append(dict(strategy=v.name, mode=mode, shape=k, library=library, fsdp=fsdp, metadata=len(metadata)))
    return got


def verify(worlds: list[int], shapes: list) -> int:
    """Run every case at every world size and compare with the closed forms; return the cases checked."""
    checked = 0
    for world in worlds:
        per_rank = run_ranks(world, _measure, shapes, timeout=900)
        for rank, cases in enumerate(per_rank):
            for got in cases:
                cfg_kw, B, L = shapes[got["shape"]]
                case = Case(got["strategy"], odysseus.TransformerConfig(**cfg_kw), B, L, world, rank, 2)
                s, reshard = got["strategy"], got["mode"] != "keep"
                every = strategy_records(case, reshard)
                fsdp = zero3_records(case, reshard) if got["mode"] else []
                library = list((Counter(every) - Counter(fsdp)).elements())
                where = f"{s} (zero3 {got['mode']}) at N={world}, rank {rank}, shape {cfg_kw}, B={B}, L={L}"
                for what, measured, formula in (("library", got["library"], library), ("FSDP2", got["fsdp"], fsdp)):
                    if sorted(measured) != sorted(formula):
                        raise AssertionError(
                            f"{what} collectives differ from the closed form for {where}:\n"
                            f"  measured {sorted(measured)}\n  formula  {sorted(formula)}"
                        )
                want_meta = case.spec.length_exchanges
                if got["metadata"] != want_meta:
                    raise AssertionError(f"{where}: {got['metadata']} length exchanges, expected {want_meta}")
                checked += 1
    return checked


# --- the ring dim: (ring, sp) meshes --------------------------------------------------------------------------

RING_STRATEGIES = ("tp-sp", "ulysses", "odysseus")
RING_LAYOUTS = [(2, 4), (4, 8), (8, 8)]
"""(ring, sp) of the full-size ring rows: a node of 8 per ring rank; 8 x 8 = 64 ranks is past 32 query heads."""


def _measure_ring(rank: int, world: int, shapes: list) -> list[dict]:
    """On one rank of a (2, world/2) ("ring", "sp") mesh: the ring's hops and the sp part's activation records."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ring", "sp"))
    m = resolve_mesh(mesh)
    where = dict(ring_rank=dist.get_rank(m.ring), sp_rank=dist.get_rank(m.sp), sp_size=dist.get_world_size(m.sp))
    got = []
    for k, (cfg_kw, B, L) in enumerate(shapes):
        for strategy in RING_STRATEGIES:
            ref = init_weights(TransformerBlock(odysseus.TransformerConfig(**cfg_kw))).to(torch.bfloat16)
            par = odysseus.parallelize(ref, strategy, mesh)
            x = torch.randn(B, L, ref.config.hidden_size, generator=torch.Generator().manual_seed(k))
            with CommLedger() as ledger:
                par(shard_sequence(x.to(torch.bfloat16), mesh).requires_grad_()).float().square().sum().backward()
            hops = [(r.phase, r.op, r.label, r.bytes_sent, r.bytes_received) for r in ledger.select(op="send_recv")]
            sp = [(r.phase, r.op, r.category, r.bytes_received) for r in ledger.select(dim="sp", category="activation")]
            got.append(dict(strategy=strategy, shape=k, hops=hops, sp=sp, **where))
    return got


def verify_ring(world: int, shapes: list) -> int:
    """The ring's hops equal :func:`ring_collectives` in order, and the sp part's records the strategy's closed
    forms on the ring rank's tokens, on every rank of a (2, world/2) mesh; returns the cases checked."""
    checked = 0
    for rank, cases in enumerate(run_ranks(world, _measure_ring, shapes, timeout=900)):
        for got in cases:
            cfg_kw, B, L = shapes[got["shape"]]
            config, i, s, S = odysseus.TransformerConfig(**cfg_kw), got["ring_rank"], got["sp_rank"], got["sp_size"]
            hops = [
                (c.phase, c.op, c.label, c.bytes_sent, c.bytes_received)
                for c in ring_collectives(config, B, L, 2, S, i, s, 2)
            ]
            T = ring_tokens_per_rank(L, 2)[i]
            sp = [r for r in expected_records(Case(got["strategy"], config, B, T, S, s, 2)) if r[2] == "activation"]
            where = f"{got['strategy']} on (ring 2, sp {S}), rank {rank}, shape {cfg_kw}, B={B}, L={L}"
            if got["hops"] != hops:
                raise AssertionError(f"ring hops differ from the closed form for {where}:\n  {got['hops']}\n  {hops}")
            if sorted(got["sp"]) != sorted(sp):
                raise AssertionError(f"sp records differ from the closed form for {where}:\n  {got['sp']}\n  {sp}")
            checked += 1
    return checked


def ring_table(model: str, seqs: list[int]) -> str:
    """Rows (strategy, ring x sp): MiB ring rank 0 receives per block over ``ring`` (P2P) and over ``sp``."""
    mib, config = 1 << 20, get_model(model).config()
    headers = ["strategy", "ring x sp"] + [f"{dim} L={s // 1024}K" for s in seqs for dim in ("ring", "sp")]
    rows = []
    for ring, sp in RING_LAYOUTS:
        for strategy in RING_STRATEGIES:
            row = [strategy, f"{ring} x {sp}"]
            for seq in seqs:
                hops = sum(c.bytes_received for c in ring_collectives(config, 1, seq, ring, sp, 0, 0, 2))
                case = Case(strategy, config, 1, ring_tokens_per_rank(seq, ring)[0], sp, 0, 2)
                acts = sum(b for _, _, cat, b in expected_records(case) if cat == "activation")
                row += [f"{hops / mib:,.0f}", f"{acts / mib:,.0f}"]
            rows.append(row)
    return common.markdown_table(headers, rows)


def volumes(model: str, world: int, seq: int, variant: Variant) -> dict[str, int]:
    """Bytes rank 0 receives per block at full size: activations, gradient sync, ZeRO-3 parameter gathers."""
    case = Case(variant, get_model(model).config(), 1, seq, world, 0, 2)
    out = {"activation": 0, "gradient": 0, "weight": 0}
    for _, _, category, b in strategy_records(case, reshard=True):
        out[category] += b
    return out


def table(model: str, worlds: list[int], seqs: list[int]) -> str:
    """Rows (strategy, N); activation and total bytes per L, the L-independent sync columns once."""
    mib = 1 << 20
    headers = ["strategy", "N"] + [f"activations L={s // 1024}K" for s in seqs]
    headers += ["weight-grad sync", "ZeRO-3 param all-gather"] + [f"total L={s // 1024}K" for s in seqs]
    rows = []
    for world in worlds:
        for variant in VARIANTS:
            v = [volumes(model, world, seq, variant) for seq in seqs]
            row = [variant.name, world] + [f"{x['activation'] / mib:,.0f}" for x in v]
            row += [f"{v[0]['gradient'] / mib:,.0f}", f"{v[0]['weight'] / mib:,.0f}"]
            row += [f"{sum(x.values()) / mib:,.0f}" for x in v]
            rows.append(row)
    return common.markdown_table(headers, rows)


def plot(model: str, worlds: list[int], path: Path) -> None:
    """Total bytes per rank per block against L, one panel per N, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = [1024 * 2**k for k in range(0, 8)]
    fig, axes = plt.subplots(1, len(worlds), figsize=(4.2 * len(worlds), 3.8), sharey=True, squeeze=False)
    for ax, world in zip(axes[0], worlds):
        for variant in VARIANTS:
            ys = [sum(volumes(model, world, s, variant).values()) / (1 << 30) for s in seqs]
            ax.plot(seqs, ys, label=variant.name, **common.style(variant))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_title(f"N = {world}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("GiB received per rank per block (fwd+bwd)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{model}, bf16, batch 1: closed forms checked against the ledger and FSDP2", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    args = common.sweep_args(__doc__, argv, MODELS)
    worlds, seqs, shapes, check_worlds = args.worlds, args.seqs, args.shapes, args.check_worlds
    checked = verify(check_worlds, shapes)
    ring_checked = verify_ring(4, shapes)
    note = (
        f"Checked first: {checked} (strategy, ZeRO-3 mode, shape, rank) cases at N = {check_worlds} on "
        f"{len(shapes)} small bf16 shapes matched the closed forms record for record (CommLedger for the "
        "library, wrapped torch.distributed calls for FSDP2). The table extrapolates those closed forms. "
        f"Ring: {ring_checked} (strategy, shape, rank) cases on a (ring 2, sp 2) mesh matched the ring's closed "
        "forms hop for hop, and the sp part's the strategy's on the ring rank's tokens."
    )
    text = table(args.model, worlds, seqs)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "comm_volume.png"
    plot(args.model, worlds, png)
    cfg = get_model(args.model).config()
    body = "\n".join(
        [
            "## Communication volume per rank (perf/comm_volume.py)",
            "",
            f"`{common.command_line()}` — {common.today()} — {common.machine()}",
            "",
            f"MiB each rank receives per block of {args.model} (d={cfg.hidden_size}, {cfg.num_heads} heads, "
            f"{cfg.num_kv_heads} kv heads, i={cfg.intermediate_size}), batch 1, bf16, for forward + backward + "
            "gradient sync. ZeRO-3 rows are `odysseus.zero3(par)`: FSDP2 all-gathers the sharded weights in "
            "forward and again in backward and reduce-scatters their gradients (padded shards). With "
            "`reshard_after_forward=False` the backward all-gather is skipped (weights stay gathered until "
            "backward): halve the ZeRO-3 all-gather column for it.",
            "",
            note,
            "",
            text,
            "",
            "With a ring dim ((ring, sp) meshes, ranks sp-innermost): MiB ring rank 0 receives per block over "
            "`ring` (the K/V hops of forward and backward and the dK/dV hops, point-to-point) and over `sp` (the "
            "strategy's activation traffic on the ring rank's tokens), forward + backward, bf16, batch 1.",
            "",
            ring_table(args.model, seqs),
            "",
            f"Plot: [{png.name}]({png.name})",
        ]
    )
    print(body)
    common.write_section("comm_volume", body, args.results)
    return body


if __name__ == "__main__":
    main()
