"""Where torch.compile breaks the graph of a parallel block or model, for every strategy (docs/COMPILE.md).

    python examples/compile_graph_breaks.py [--world 2] [--backend aot_eager] [--model block|llama|llama-layers]

On W forked gloo ranks (CPU), compiles each strategy's ``ParallelBlock`` (``llama``: a two-layer Hugging
Face Llama through ``parallelize_llama``, whole; ``llama-layers``: the same with each decoder layer compiled
in place) and runs two forward+backward steps with dynamo's graph-break log
captured (what ``TORCH_LOGS=graph_breaks`` prints, every frame included). Prints a markdown table: frames
dynamo compiled, distinct graphs, and each break site with the odysseus frames that called it, dynamo's
explanation and how many times it was logged.
"""

from __future__ import annotations

import argparse
import logging
import os
import re

import torch

import odysseus
from odysseus import TransformerConfig, shard_sequence
from odysseus.launch import run_ranks
from odysseus.reference import TransformerBlock, init_weights
from odysseus.strategies import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(odysseus.__file__)))


def _short(path: str) -> str:
    """A path relative to the repository, or to site-packages for installed libraries."""
    return path.split("site-packages/")[-1] if "site-packages/" in path else os.path.relpath(path, ROOT)


class _Breaks(logging.Handler):
    """Collects every graph break dynamo logs, grouped by where it happens and dynamo's first explanation.

    For each group: how often it was logged, the odysseus frames that called into it (dynamo prints the stack
    once per site), and any further break dynamo hit while handling it.
    """

    def __init__(self):
        super().__init__()
        self.sites: dict[tuple[str, str], dict] = {}

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        at = re.search(r"in user code at (\S+):(\d+)", text)
        where = f"{_short(at[1])}:{at[2]}" if at else "?"
        reasons = [re.sub(r" at 0x[0-9a-f]+", "", e.strip()) for e in re.findall(r"Explanation: (.*)", text)]
        first = reasons[0] if reasons else text[:200]
        site = self.sites.setdefault((where, first), {"n": 0, "from": set(), "then": set()})
        site["n"] += 1
        site["then"].update(reasons[1:])
        frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text)
        frames = [f for f in frames if "multiprocessing" not in f[0] and "torch/nn/modules" not in f[0]]
        if len(frames) >= 2:
            f, line, name = frames[-2]
            site["from"].add(f"{_short(f)}:{line} {name}")


def _model(strategy: str, kind: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The parallel module to compile and a full-sequence input for it."""
    if kind.startswith("llama"):
        from transformers import LlamaConfig, LlamaForCausalLM

        from odysseus.integrations.hf import parallelize_llama

        config = LlamaConfig(
            hidden_size=96,
            num_attention_heads=6,
            num_key_value_heads=2,
            num_hidden_layers=2,
            intermediate_size=160,
            vocab_size=128,
        )
        return parallelize_llama(LlamaForCausalLM(config), strategy), torch.randint(0, 128, (2, 61))
    config = TransformerConfig(hidden_size=96, num_heads=6, num_kv_heads=2, intermediate_size=160)
    return odysseus.parallelize(init_weights(TransformerBlock(config)), strategy), torch.randn(2, 61, 96)


def _breaks(rank: int, world: int, strategy: str, backend: str, kind: str) -> dict:
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    counters.clear()
    handler = _Breaks()
    # dynamo writes each break to its modules' "graph_breaks" artifact loggers when they are enabled for
    # DEBUG (what TORCH_LOGS=graph_breaks does); capture them here instead of printing.
    logs = [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict) if n.endswith(".__graph_breaks")]
    for log in logs:
        log.setLevel(logging.DEBUG)
        log.propagate = False
        log.addHandler(handler)
    module, x = _model(strategy, kind)
    if kind == "llama-layers":
        for layer in module.model.layers:
            layer.compile(backend=backend)
        compiled = module
    else:
        compiled = torch.compile(module, backend=backend)
    for _ in range(2):
        out = compiled(shard_sequence(x) if registry.get(strategy).sequence_split else x)
        (out.logits if kind.startswith("llama") else out).sum().backward()
    for log in logs:
        log.removeHandler(handler)
    return {
        "frames": counters["frames"]["total"],
        "graphs": counters["stats"]["unique_graphs"],
        "sites": handler.sites,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--model", choices=("block", "llama", "llama-layers"), default="block")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, world {args.world}, {args.model}, backend {args.backend}, fwd+bwd twice\n")
    print("| strategy | frames | graphs | break at | called from | dynamo's explanation | logged |")
    print("|---|---|---|---|---|---|---|")
    for strategy in odysseus.STRATEGIES:
        got = run_ranks(args.world, _breaks, strategy, args.backend, args.model, timeout=600)[0]
        head = f"| `{strategy}` | {got['frames']} | {got['graphs']} |"
        if not got["sites"]:
            print(f"{head} none | | | |")
        for i, ((where, reason), site) in enumerate(sorted(got["sites"].items())):
            explanation = " ".join([reason, *(f"Then: {t}" for t in sorted(site["then"]))]).replace("|", "/")
            callers = ", ".join(sorted(site["from"]))
            print(f"{head if i == 0 else '| | | |'} {where} | {callers} | {explanation} | {site['n']} |")


if __name__ == "__main__":
    main()
