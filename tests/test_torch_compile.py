"""torch.compile of a ParallelBlock gives eager mode's output and gradients, for every strategy at world 2;
so does a parallelize_llama model whose decoder layers are compiled one by one.

The backend is ``aot_eager`` (dynamo + AOTAutograd, no code generation): inductor compiles the same graphs
correctly but takes 25-50 s per strategy on a cold CPU cache (docs/COMPILE.md), too slow for the suite.
``ODYSSEUS_COMPILE_BACKEND=inductor pytest tests/test_torch_compile.py`` runs it with inductor.
"""

import os

import pytest
import torch
from helpers import ODD, assert_close, local_input, make_block
from multirank import run_ranks

import odysseus
from odysseus import STRATEGIES, finalize_grads, shard_sequence
from odysseus.strategies import registry

BACKEND = os.environ.get("ODYSSEUS_COMPILE_BACKEND", "aot_eager")


def _step(block, strategy, x, gy):
    split = registry.get(strategy).sequence_split
    xi = (shard_sequence(x) if split else x).detach().requires_grad_()
    y = block(xi)
    (y * (shard_sequence(gy) if split else gy)).sum().backward()
    finalize_grads(block)
    return y.detach(), xi.grad, {k: p.grad for k, p in block.named_parameters()}


def _fresh_compiler():
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    counters.clear()
    return counters


def _compiled_vs_eager(rank, world, strategy, backend):
    counters = _fresh_compiler()
    ref = make_block(torch.float32, **ODD)
    eager = odysseus.parallelize(ref, strategy)
    compiled = torch.compile(odysseus.parallelize(ref, strategy), backend=backend)
    g = torch.Generator().manual_seed(1)
    for step in range(2):  # the second call runs the cached graphs
        x, gy = torch.randn(2, 61, 96, generator=g), torch.randn(2, 61, 96, generator=g)
        eager.zero_grad()
        compiled.zero_grad()
        y_e, gx_e, gw_e = _step(eager, strategy, x, gy)
        y_c, gx_c, gw_c = _step(compiled, strategy, x, gy)
        tol = dict(rtol=1e-5, atol=1e-5, scaled=True)
        assert_close(y_c, y_e, **tol, what=f"{strategy} step {step} output")
        assert_close(gx_c, gx_e, **tol, what=f"{strategy} step {step} x.grad")
        for k in gw_e:
            assert_close(gw_c[f"_orig_mod.{k}"], gw_e[k], **tol, what=f"{strategy} step {step} {k}.grad")
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    return True


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_block_matches_eager_numerics(strategy):
    assert all(run_ranks(2, _compiled_vs_eager, strategy, BACKEND, timeout=600))


def _compiled_llama_layers(rank, world, strategy, backend):
    from test_hf_numerics import batch, tiny_llama

    from odysseus.integrations.hf import causal_lm_loss, finalize_model_grads, hf_state_dict, parallelize_llama

    counters = _fresh_compiler()
    eager, compiled = (parallelize_llama(tiny_llama(), strategy) for _ in range(2))
    for layer in compiled.model.layers:  # per layer, as docs/COMPILE.md recommends: HF's layer loop stays eager
        layer.compile(backend=backend)
    ids, labels = batch()
    out = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        logits = model(local_input(strategy, ids)).logits
        causal_lm_loss(logits, labels).backward()
        finalize_model_grads(model)
        out[name] = logits.detach(), hf_state_dict(model, grad=True)
    tol = dict(rtol=1e-5, atol=1e-5, scaled=True)
    assert_close(out["compiled"][0], out["eager"][0], **tol, what=f"{strategy} logits")
    for k, g in out["eager"][1].items():
        assert_close(out["compiled"][1][k], g, **tol, what=f"{strategy} {k}.grad")
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    return True


@pytest.mark.parametrize("strategy", ["tp", "odysseus"])
def test_compiled_llama_layers_match_eager_numerics(strategy):
    assert all(run_ranks(2, _compiled_llama_layers, strategy, BACKEND, timeout=600))
