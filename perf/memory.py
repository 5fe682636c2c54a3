"""Memory per rank per block: activations saved for backward, parameters, gradients and AdamW states.

    python perf/memory.py                          # N = 2,4,8; L = 4K,16K,64K; Llama-2-7B shape, bf16
    python perf/memory.py --quick --out /tmp/mem   # smaller check, for tests

As in ``perf/comm_volume.py``, small shapes are measured first and the closed forms are extrapolated only
once they match exactly, on every rank:

- activations: ``odysseus.profiling.SavedActivations`` (saved-tensor hooks: every storage autograd keeps
  for backward, parameters excluded) over one bf16 forward, against ``odysseus.plan.saved_activation_bytes``;
- parameters, gradients (after backward and ``finalize_grads``) and AdamW's two moment buffers (after
  one ``step()``), against ``odysseus.plan.parameter_bytes``; for the ZeRO-3 variants FSDP2's sharded
  parameters count their padded storage, gradients and moments their unpadded shard.

Shapes cover even and uneven sequences, several widths and GQA (with expanded kv heads at N = 8), so the
forms are checked in every variable they extrapolate in. The ZeRO-3 variants save the same activations as
their base strategy and are measured here for parameters, gradients and optimizer states only.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import common
import torch

import odysseus
from odysseus import finalize_grads, shard_sequence
from odysseus.launch import run_ranks
from odysseus.plan import MODELS, Case, get_model, parameter_bytes, saved_activation_bytes
from odysseus.profiling import SavedActivations
from odysseus.reference import TransformerBlock, init_weights
from odysseus.strategies.registry import VARIANTS


def _local_bytes(t: torch.Tensor, padded: bool = False) -> int:
    """Bytes of this rank's part of ``t``; for an FSDP2 DTensor its shard (``padded``: its whole buffer)."""
    local = getattr(t, "_local_tensor", t)
    if padded and local is not t:
        return local.untyped_storage().nbytes()
    return local.numel() * local.element_size()


def _measure(rank: int, world: int, shapes: list) -> list[dict]:
    out = []
    for k, (cfg_kw, B, L) in enumerate(shapes):
        ref = init_weights(TransformerBlock(odysseus.TransformerConfig(**cfg_kw))).to(torch.bfloat16)
        x = torch.randn(B, L, ref.config.hidden_size, generator=torch.Generator().manual_seed(k), dtype=torch.bfloat16)
        for v in VARIANTS:
            par = odysseus.parallelize(ref, v.spec.name)
            if v.zero3:
                par = odysseus.zero3(par)
            xin = (shard_sequence(x) if v.spec.sequence_split else x).detach().requires_grad_()
            # ZeRO-3 rows report the base strategy's activations: the weights FSDP2 gathers are not activations.
            zero3 = v.zero3
            with nullcontext() if zero3 else SavedActivations(par) as saved:
                y = par(xin)
            y.float().square().sum().backward()
            finalize_grads(par)
            opt = torch.optim.AdamW(par.parameters(), lr=1e-3)
            opt.step()
            moments = sum(_local_bytes(v) for st in opt.state.values() for n, v in st.items() if n != "step")
            out.append(
                dict(
                    strategy=v.name,
                    shape=k,
                    saved=None if zero3 else saved.peak_bytes,
                    params=sum(_local_bytes(p, padded=True) for p in par.parameters()),
                    grads=sum(_local_bytes(p.grad) for p in par.parameters()),
                    adamw=moments,
                )
            )
    return out


def verify(worlds: list[int], shapes: list) -> int:
    """Measure every strategy at every world and shape; raise on any difference; return the cases checked."""
    checked = 0
    for world in worlds:
        for rank, cases in enumerate(run_ranks(world, _measure, shapes, timeout=900)):
            for got in cases:
                cfg_kw, B, L = shapes[got["shape"]]
                s = got["strategy"]
                case = Case(s, odysseus.TransformerConfig(**cfg_kw), B, L, world, rank, 2)
                want = parameter_bytes(case)
                if got["saved"] is not None:
                    want["saved"] = saved_activation_bytes(case)
                measured = {k: got[k] for k in want}
                if measured != want:
                    raise AssertionError(
                        f"{s} at N={world}, rank {rank}, shape {cfg_kw}, B={B}, L={L}: measured {measured}, "
                        f"closed form {want}"
                    )
                checked += 1
    return checked


def table(model: str, worlds: list[int], seqs: list[int]) -> str:
    """Rows (strategy, N): saved activations per L (GiB), params/grads/AdamW (MiB), all per block on rank 0."""
    m = get_model(model)
    cfg = m.config()
    gib, mib = 1 << 30, 1 << 20
    headers = ["strategy", "N"] + [f"activations L={s // 1024}K (GiB)" for s in seqs]
    headers += ["params (MiB)", "grads (MiB)", "AdamW 2 states (MiB)"]
    headers += [f"{m.num_layers} blocks at L={seqs[-1] // 1024}K (GiB)"]
    rows = []
    for world in worlds:
        for v in VARIANTS:
            acts = [saved_activation_bytes(Case(v, cfg, 1, seq, world, 0, 2)) for seq in seqs]
            pb = parameter_bytes(Case(v, cfg, 1, seqs[-1], world, 0, 2))
            row = [v.name, world] + [f"{a / gib:.2f}" for a in acts]
            row += [f"{pb['params'] / mib:,.1f}", f"{pb['grads'] / mib:,.1f}", f"{pb['adamw'] / mib:,.1f}"]
            row.append(f"{m.num_layers * (acts[-1] + sum(pb.values())) / gib:,.1f}")
            rows.append(row)
    return common.markdown_table(headers, rows)


def plot(model: str, worlds: list[int], path: Path) -> None:
    """Saved activations per block against L (one panel per N) and params+grads+AdamW per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = get_model(model).config()
    seqs = [1024 * 2**k for k in range(0, 8)]
    fig, axes = plt.subplots(1, len(worlds) + 1, figsize=(4.0 * (len(worlds) + 1), 3.8), squeeze=False)
    for ax, world in zip(axes[0], worlds):
        for v in (v for v in VARIANTS if not v.zero3):  # a ZeRO-3 variant saves what its strategy saves
            ys = [saved_activation_bytes(Case(v, cfg, 1, L, world, 0, 2)) / (1 << 30) for L in seqs]
            ax.plot(seqs, ys, label=v.name, **common.style(v))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_title(f"saved activations, N = {world}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("GiB per rank per block")
    axes[0][0].legend(fontsize=7)
    ax = axes[0][-1]
    world = worlds[-1]
    bottoms = [0.0] * len(VARIANTS)
    for part, color in (("params", "C0"), ("grads", "C1"), ("adamw", "C2")):
        vals = [parameter_bytes(Case(v, cfg, 1, seqs[-1], world, 0, 2))[part] / (1 << 20) for v in VARIANTS]
        ax.bar(range(len(vals)), vals, bottom=bottoms, color=color, label=part)
        bottoms = [b + x for b, x in zip(bottoms, vals)]
    names = [v.name for v in VARIANTS]
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
    ax.set_title(f"weights, N = {world}")
    ax.set_ylabel("MiB per rank per block")
    ax.legend(fontsize=7)
    fig.suptitle(f"{model}, bf16, batch 1: closed forms checked against SavedActivations and FSDP2", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    args = common.sweep_args(__doc__, argv, MODELS)
    worlds, seqs, shapes, check_worlds = args.worlds, args.seqs, args.shapes, args.check_worlds
    checked = verify(check_worlds, shapes)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "memory.png"
    plot(args.model, worlds, png)
    cfg = get_model(args.model).config()
    body = "\n".join(
        [
            "## Memory per rank (perf/memory.py)",
            "",
            f"`{common.command_line()}` — {common.today()} — {common.machine()}",
            "",
            f"Per block of {args.model} (d={cfg.hidden_size}, {cfg.num_heads} heads, {cfg.num_kv_heads} kv heads, "
            f"i={cfg.intermediate_size}), batch 1, bf16, on rank 0: bytes autograd saves for backward, and "
            "parameter, gradient and AdamW-moment bytes (moments in the parameter dtype, as torch.optim.AdamW "
            "keeps them; mixed-precision training adds fp32 master weights and fp32 moments, which "
            "`odysseus.plan` counts). ZeRO-3 rows: `odysseus.zero3(par)` (weights resharded after forward); their "
            "activations are those of the base strategy; their parameters include FSDP2's padding. The last "
            "column multiplies by the layer count, without recomputation, embeddings or logits.",
            "",
            f"Checked first: {checked} (strategy, shape, rank) cases at N = {check_worlds} on {len(shapes)} "
            "small bf16 shapes matched the closed forms exactly (SavedActivations for activations; parameter, "
            "gradient and AdamW-state storage for the rest). The table extrapolates those closed forms.",
            "",
            table(args.model, worlds, seqs),
            "",
            f"Plot: [{png.name}]({png.name})",
        ]
    )
    print(body)
    common.write_section("memory", body, args.results)
    return body


if __name__ == "__main__":
    main()
