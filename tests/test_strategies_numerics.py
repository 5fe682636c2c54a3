"""Every strategy against the reference block with identical weights: output, input grad, every weight grad."""

import pytest
import torch
from helpers import EVEN, ODD, assert_close, make_block, rel_err
from multirank import run_ranks

import odysseus
from odysseus import STRATEGIES, dense_state_dict, finalize_grads, gather_sequence, shard_sequence


def run_parallel(par, strategy, x, gy, position_ids=None):
    """Forward+backward of a parallel module on the full input ``x``; returns (full output, x.grad)."""
    xp = x.detach().clone().requires_grad_()
    if strategy == "tp":
        y = par(xp) if position_ids is None else par(xp, position_ids)
        (y * gy).sum().backward()  # TP: the loss is replicated, every rank computes it whole
        full = y.detach()
    else:
        pos = None if position_ids is None else shard_sequence(position_ids)
        y = par(shard_sequence(xp)) if pos is None else par(shard_sequence(xp), pos)  # FFNs take no positions
        (y * shard_sequence(gy)).sum().backward()  # global loss = sum of the ranks' local losses
        full = gather_sequence(y.detach())
    finalize_grads(par)
    return full, xp.grad


def run_reference(ref, x, gy, position_ids=None):
    xr = x.detach().clone().requires_grad_()
    y = ref(xr, position_ids) if position_ids is not None else ref(xr)
    y.backward(gy)
    return y.detach(), xr.grad, {k: p.grad for k, p in ref.named_parameters()}


def _parity(rank, world, strategy, shape, B, L, what, with_pos, backend="auto"):
    ref = make_block(torch.float32, **shape)
    if what == "attn":
        ref = ref.self_attn
    elif what == "ffn":
        ref = ref.mlp
    par = odysseus.parallelize(ref, strategy, backend=backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, ref.config.hidden_size, generator=g)
    gy = torch.randn(B, L, ref.config.hidden_size, generator=g)
    pos = torch.randint(0, 10_000, (B, L), generator=g) if with_pos else None
    y_ref, gx_ref, gw_ref = run_reference(ref, x, gy, pos)
    y, gx = run_parallel(par, strategy, x, gy, pos)
    tol = dict(rtol=1e-5, atol=1e-5, scaled=True)
    assert_close(y, y_ref, **tol, what=f"{strategy} output")
    assert_close(gx, gx_ref, **tol, what=f"{strategy} x.grad")
    weights, grads = dense_state_dict(par), dense_state_dict(par, grad=True)
    assert set(grads) == set(gw_ref), (sorted(grads), sorted(gw_ref))
    for k in gw_ref:
        assert torch.equal(weights[k], ref.state_dict()[k]), f"{k} weight"
        assert_close(grads[k], gw_ref[k], **tol, what=f"{strategy} {k}.grad")
    return True


# The overlap backends that run on CPU tensors; TP and Ulysses have no all-gather⊗GEMM to overlap.
STRATEGY_BACKENDS = [("tp", "auto"), ("ulysses", "auto")] + [
    (s, b) for s in ("tp-sp", "odysseus") for b in ("naive", "pipelined")
]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy, backend", STRATEGY_BACKENDS)
@pytest.mark.parametrize("shape", [ODD, EVEN], ids=["odd", "even"])
def test_block_parity_fp32_numerics(strategy, backend, world, shape):
    B, L = (2, 61) if shape is ODD else (1, 32)
    assert all(run_ranks(world, _parity, strategy, shape, B, L, "block", False, backend))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("what", ["attn", "ffn"])
def test_module_parity_fp32_numerics(strategy, what):
    assert all(run_ranks(3, _parity, strategy, ODD, 2, 61, what, False))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_given_positions_parity_numerics(strategy):
    assert all(run_ranks(3, _parity, strategy, ODD, 2, 61, "block", True))


def _bf16(rank, world, strategy, backend):
    ref64 = make_block(torch.float64, **ODD)
    ref16 = make_block(torch.bfloat16, **ODD)
    par = odysseus.parallelize(ref16, strategy, backend=backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 61, 96, generator=g, dtype=torch.float64)
    gy = torch.randn(2, 61, 96, generator=g, dtype=torch.float64)
    y64, gx64, gw64 = run_reference(ref64, x, gy)
    y16, gx16, gw16 = run_reference(ref16, x.bfloat16(), gy.bfloat16())
    y, gx = run_parallel(par, strategy, x.bfloat16(), gy.bfloat16())
    grads = dense_state_dict(par, grad=True)
    pairs = [("output", y, y16, y64), ("x.grad", gx, gx16, gx64)]
    pairs += [(k, grads[k], gw16[k], gw64[k]) for k in gw64]
    report = {}
    for name, ours, base, truth in pairs:
        e_ours, e_base = rel_err(ours, truth), rel_err(base, truth)
        report[name] = (e_ours, e_base)
        assert e_ours <= 3 * e_base + 1e-3, f"{strategy} {name}: bf16 error {e_ours:.2e} vs reference bf16 {e_base:.2e}"
    return report


@pytest.mark.parametrize("strategy, backend", STRATEGY_BACKENDS)
def test_bf16_error_within_3x_reference_numerics(strategy, backend):
    run_ranks(3, _bf16, strategy, backend)
