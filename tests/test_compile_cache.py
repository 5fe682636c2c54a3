"""A warm on-disk inductor cache shared by the ranks cannot hand one rank another rank's graph.

Two ranks with uneven shards (31 and 30 tokens of 61) feed GEMM⊗reduce-scatter inputs of the same shape,
so their graphs differ only in what the op returns: this rank's shard. The test compiles with inductor,
empties every in-memory cache, compiles again (now from the shared on-disk FX-graph and AOTAutograd
caches) and checks both runs against eager mode. When the fake kernel read the rank from the process group,
both ranks' graphs had one cache key and the warm run failed on one rank with
``expected size 31==30 ... odysseus.matmul_rs``.
"""

import os

import torch
from helpers import assert_close
from multirank import run_ranks

from odysseus import comm
from odysseus.overlap import ag_matmul, matmul_rs

L, K, N = 61, 12, 16


def _step(x, w, w2, pg, sizes):
    h = matmul_rs(torch.sin(x), w, sizes, pg, "naive", "test.rs")  # (2, L_r, N), this rank's shard
    return ag_matmul(h * 2, w2, sizes, pg, "naive", "test.ag")  # (2, L, K) again


def _run(fn, x, w, w2):
    x, w, w2 = (t.detach().clone().requires_grad_() for t in (x, w, w2))
    y = fn(x, w, w2)
    y.square().sum().backward()
    return y.detach(), x.grad, w.grad, w2.grad


def _cold_then_warm(rank, world, cache_dir):
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import clear_caches

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # read when the cache is touched, shared by the ranks
    inductor_config.compile_threads = 1  # no worker pool inside the forked ranks
    inductor_config.fx_graph_cache = True
    pg = comm.resolve_group(None)
    sizes = comm.shard_sizes(L, world)
    g = torch.Generator().manual_seed(rank)  # ranks hold different partial sums, of the same shape
    x, w, w2 = torch.randn(2, L, K, generator=g), torch.randn(K, N, generator=g), torch.randn(N, K, generator=g)

    def fn(a, b, c):
        return _step(a, b, c, pg, sizes)

    eager = _run(fn, x, w, w2)
    hits = []
    for _ in range(2):  # cold cache, then warm
        torch._dynamo.reset()
        clear_caches()
        from torch._dynamo.utils import counters

        counters.clear()
        got = _run(torch.compile(fn, backend="inductor"), x, w, w2)
        for name, a, e in zip(("y", "x.grad", "w.grad", "w2.grad"), got, eager):
            assert_close(a, e, rtol=1e-5, atol=1e-5, scaled=True, what=f"rank {rank} {name}")
        hits.append(counters["inductor"]["fxgraph_cache_hit"])
    return hits


def test_warm_compile_cache_keeps_each_rank_its_graph(tmp_path):
    hits = run_ranks(2, _cold_then_warm, str(tmp_path / "inductor"), timeout=600)
    # The second compile really loaded graphs from disk (forward and backward) on every rank.
    assert all(h[1] >= 2 for h in hits), hits
