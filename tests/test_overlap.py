"""all-gather⊗GEMM and GEMM⊗reduce-scatter ops on every CPU backend: values, gradients, ledger, compile."""

import pytest
import torch
from helpers import ODD, assert_close, make_block
from multirank import run_ranks

import odysseus
from odysseus import CommLedger
from odysseus.comm import offsets, resolve_group, shard_sizes
from odysseus.overlap import ag_matmul, matmul_rs

CPU_BACKENDS = ["naive", "pipelined"]


def _ops(rank, world, backend, L, dtype):
    """Both ops against dense fp64 math on gathered tensors, forward and backward."""
    pg = resolve_group()
    sizes, o = shard_sizes(L, world), offsets(shard_sizes(L, world))
    B, K, N = 2, 24, 40
    g = torch.Generator().manual_seed(7)
    x_full = torch.randn(B, L, K, generator=g, dtype=torch.float64)
    w_all = [torch.randn(K, N, generator=g, dtype=torch.float64) for _ in range(world)]  # rank r's columns
    gy_all = [torch.randn(B, L, N, generator=g, dtype=torch.float64) for _ in range(world)]
    tol = (
        dict(rtol=1e-5, atol=1e-5, scaled=True) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12, scaled=True)
    )

    x = x_full[:, o[rank] : o[rank + 1]].to(dtype, copy=True).requires_grad_()
    w = w_all[rank].to(dtype, copy=True).requires_grad_()
    with CommLedger() as led:
        y = ag_matmul(x, w, sizes, pg, backend, "t")
        (y * gy_all[rank].to(dtype)).sum().backward()
    assert_close(y, x_full @ w_all[rank], **tol, what="ag_matmul")
    # loss = sum_r <gather(x) @ w_r, gy_r>: dx = sum_r gy_r @ w_r^T on my rows, dw_r = gather(x)^T gy_r
    dx = sum(gy_all[r] @ w_all[r].T for r in range(world))[:, o[rank] : o[rank + 1]]
    assert_close(x.grad, dx, **tol, what="ag_matmul dx")
    assert_close(w.grad, x_full.flatten(0, 1).T @ gy_all[rank].flatten(0, 1), **tol, what="ag_matmul dw")
    ag_records = [(r.op, r.phase) for r in led.records]

    # matmul_rs: rank r holds x_r (B, L, K) and w_r (K, N); y = (sum_r x_r @ w_r)[my rows]
    xs = [torch.randn(B, L, K, generator=g, dtype=torch.float64) for _ in range(world)]
    gy = torch.randn(B, L, N, generator=g, dtype=torch.float64)  # rank r's loss uses gy's rows of r
    x2 = xs[rank].to(dtype, copy=True).requires_grad_()
    w2 = w_all[rank].to(dtype, copy=True).requires_grad_()
    with CommLedger() as led:
        y2 = matmul_rs(x2, w2, sizes, pg, backend, "t")
        (y2 * gy[:, o[rank] : o[rank + 1]].to(dtype)).sum().backward()
    assert_close(y2, sum(xs[r] @ w_all[r] for r in range(world))[:, o[rank] : o[rank + 1]], **tol, what="matmul_rs")
    assert_close(x2.grad, gy @ w_all[rank].T, **tol, what="matmul_rs dx")
    assert_close(w2.grad, xs[rank].flatten(0, 1).T @ gy.flatten(0, 1), **tol, what="matmul_rs dw")
    rs_records = [(r.op, r.phase) for r in led.records]
    return ag_records, rs_records


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("world, L", [(1, 7), (2, 8), (3, 61), (4, 61)])
def test_ops_match_dense_math_numerics(backend, world, L):
    for ag, rs in run_ranks(world, _ops, backend, L, torch.float32):
        if world > 1:  # one logical collective per op and direction, whatever the backend
            assert ag == [("all_gather", "forward"), ("reduce_scatter", "backward")]
            assert rs == [("reduce_scatter", "forward"), ("all_gather", "backward")]


def test_ops_in_fp64_numerics():
    run_ranks(3, _ops, "pipelined", 61, torch.float64)


def _shape_changes(rank, world, backend):
    """A sequence of calls with different lengths and two modules on one group stay correct."""
    ref = make_block(**ODD)
    a = odysseus.parallelize(ref.self_attn, "odysseus", backend=backend)
    b = odysseus.parallelize(ref.mlp, "tp-sp", backend=backend)
    for L in (61, 16, 33, 61):
        x = torch.randn(1, L, 96, generator=torch.Generator().manual_seed(L))
        got = odysseus.gather_sequence(b(a(odysseus.shard_sequence(x))))
        assert_close(got, ref.mlp(ref.self_attn(x)), 1e-5, 1e-5, f"L={L}", scaled=True)
    return True


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shape_changes_and_shared_group(backend):
    assert all(run_ranks(3, _shape_changes, backend))


def _compiled(rank, world):
    ref = make_block(**ODD).self_attn
    par = odysseus.parallelize(ref, "odysseus", backend="pipelined")
    x = odysseus.shard_sequence(torch.randn(2, 61, 96, generator=torch.Generator().manual_seed(0)))
    xe = x.clone().requires_grad_()
    par(xe).square().sum().backward()
    eager = {k: p.grad.clone() for k, p in par.named_parameters()}
    par.zero_grad()
    xc = x.clone().requires_grad_()
    compiled = torch.compile(par, backend="aot_eager")
    with CommLedger() as led:
        yc = compiled(xc)
        yc.square().sum().backward()
    assert_close(yc, par(x), 1e-5, 1e-5, "compiled output", scaled=True)
    assert_close(xc.grad, xe.grad, 1e-5, 1e-5, "compiled x.grad", scaled=True)
    for k, p in par.named_parameters():
        assert_close(p.grad, eager[k], 1e-5, 1e-5, f"compiled {k}.grad", scaled=True)
    return led.count("op", category="activation")


def test_torch_compile_traces_odysseus_attention_pipelined():
    # The ops run at runtime inside the compiled graph, so the ledger still sees them.
    assert run_ranks(2, _compiled)[0] == {"all_gather": 2, "reduce_scatter": 2}
