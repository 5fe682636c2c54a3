"""Where torch.compile breaks the graph of a ParallelBlock, for every strategy (the table in docs/COMPILE.md).

    python examples/compile_graph_breaks.py [--world 2]

Runs ``torch._dynamo.explain`` on each strategy's block on W forked gloo ranks (CPU) and prints a markdown
table: graphs, breaks, and each distinct break with its source line and dynamo's reason. Explain traces the
forward; AOTAutograd derives each graph's backward from it, so the backward has the same pieces.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter

import torch

import odysseus
from odysseus import TransformerConfig, shard_sequence
from odysseus.launch import run_ranks
from odysseus.reference import TransformerBlock, init_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(odysseus.__file__)))


def _reason(text: str) -> str:
    """dynamo's one-line explanation of a break (its messages span several lines)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    explanation = next((line for line in lines if line.startswith("Explanation:")), lines[0])
    return explanation.removeprefix("Explanation:").strip()


def _explain(rank: int, world: int, strategy: str) -> dict:
    import torch._dynamo

    torch._dynamo.reset()
    config = TransformerConfig(hidden_size=96, num_heads=6, num_kv_heads=2, intermediate_size=160)
    block = odysseus.parallelize(init_weights(TransformerBlock(config)), strategy)
    x = torch.randn(2, 61, 96)
    result = torch._dynamo.explain(block)(x if strategy == "tp" else shard_sequence(x))
    breaks = Counter()
    for b in result.break_reasons:
        frame = b.user_stack[-1] if b.user_stack else None
        where = f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno} ({frame.name})" if frame else "?"
        breaks[(where, _reason(b.reason))] += 1
    return {"graphs": result.graph_count, "breaks": result.graph_break_count, "reasons": breaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, world {args.world}\n")
    print("| strategy | graphs | breaks | where (times reported) | reason |")
    print("|---|---|---|---|---|")
    for strategy in odysseus.STRATEGIES:
        got = run_ranks(args.world, _explain, strategy, timeout=600)[0]
        rows = sorted(got["reasons"].items()) or [(("-", "-"), 0)]
        for i, ((where, reason), n) in enumerate(rows):
            head = f"| `{strategy}` | {got['graphs']} | {got['breaks']} |" if i == 0 else "| | | |"
            count = f" ({n}x)" if n else ""
            print(f"{head} {where}{count} | {reason.replace('|', '/')} |")


if __name__ == "__main__":
    main()
