"""The four strategies side by side on CPU (gloo), each checked against the single-device reference.

    python -m odysseus.demo [--world 4] [--seq 1024]

For every strategy it prints what it measured: the largest relative error of the output and of the
gradients against the reference block, the bytes each rank received in forward+backward (CommLedger),
the bytes of activations each rank saved for backward, and the median step time. Timings are CPU
ratios between strategies on this machine, not GPU predictions.
"""

from __future__ import annotations

import argparse

import torch

import odysseus
from odysseus import CommLedger, finalize_grads, shard_sequence
from odysseus.launch import run_ranks
from odysseus.parity import relative_errors, run_parallel, run_reference
from odysseus.profiling import SavedActivations, median_time
from odysseus.reference import TransformerBlock, init_weights


def _measure(rank: int, world: int, config: odysseus.TransformerConfig, seq: int, repeats: int) -> list[dict]:
    ref = init_weights(TransformerBlock(config), std=0.05, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, seq, config.hidden_size, generator=g)
    gy = torch.randn(1, seq, config.hidden_size, generator=g)
    want = run_reference(ref, x, gy)
    rows = []
    for strategy in odysseus.STRATEGIES:
        block = odysseus.parallelize(ref, strategy)
        errors = relative_errors(run_parallel(block, x, gy), want)
        xin, gin = (shard_sequence(x), shard_sequence(gy)) if block.sequence_split else (x, gy)

        def step(block=block, xin=xin, gin=gin):
            block.zero_grad()
            y = block(xin.detach().requires_grad_())
            (y * gin).sum().backward()
            finalize_grads(block)

        with CommLedger() as ledger:
            with SavedActivations(block) as saved:
                step()
        rows.append(
            dict(
                strategy=strategy,
                err_out=errors.pop("output"),
                err_grad=max(errors.values()),
                act_bytes=ledger.bytes(category="activation"),
                grad_bytes=ledger.bytes(category="gradient"),
                saved=saved.peak_bytes,
                ms=1e3 * median_time(step, repeats=repeats),
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    config = odysseus.TransformerConfig(hidden_size=256, num_heads=8, num_kv_heads=4, intermediate_size=688)
    print(
        f"odysseus demo: one Llama block (hidden {config.hidden_size}, {config.num_heads} heads, "
        f"{config.num_kv_heads} kv heads, FFN {config.intermediate_size}), sequence {args.seq}, batch 1, fp32, "
        f"{args.world} gloo ranks on CPU\n"
    )
    per_rank = run_ranks(args.world, _measure, config, args.seq, args.repeats, timeout=600)
    print(
        "| strategy | max rel err out | max rel err grads | recv KiB/rank act | recv KiB/rank grad "
        "| saved act KiB/rank | step ms (median, max over ranks) |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, strategy in enumerate(odysseus.STRATEGIES):
        rows = [r[i] for r in per_rank]
        print(
            f"| {strategy} | {max(r['err_out'] for r in rows):.1e} | {max(r['err_grad'] for r in rows):.1e} "
            f"| {max(r['act_bytes'] for r in rows) / 1024:.0f} | {max(r['grad_bytes'] for r in rows) / 1024:.0f} "
            f"| {max(r['saved'] for r in rows) / 1024:.0f} | {max(r['ms'] for r in rows):.1f} |"
        )
    print("\nBytes are what each rank received in one forward+backward+finalize_grads (the largest rank).")
    print("Step times are CPU wall-clock on this machine: compare strategies with each other, not with GPUs.")


if __name__ == "__main__":
    main()
