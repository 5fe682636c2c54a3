"""The symm backend on CUDA: several ranks share one GPU (TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1).

Ranks talk over gloo (NCCL refuses two ranks on one device); symmetric memory rendezvous goes through the
store. Skipped without CUDA.
"""

import pytest
import torch
from helpers import ODD, make_block, rel_err
from multirank import run_ranks
from test_strategies_numerics import run_parallel, run_reference

import odysseus

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _overlapping_devices(monkeypatch):
    monkeypatch.setenv("TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES", "1")


def _symm_bf16(rank, world, strategy):
    torch.cuda.set_device(0)
    ref64 = make_block(torch.float64, **ODD).cuda()
    ref16 = make_block(torch.bfloat16, **ODD).cuda()
    par = odysseus.parallelize(ref16, strategy, backend="symm")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 61, 96, generator=g, dtype=torch.float64).cuda()
    gy = torch.randn(2, 61, 96, generator=g, dtype=torch.float64).cuda()
    y64, gx64, gw64 = run_reference(ref64, x, gy)
    y16, gx16, gw16 = run_reference(ref16, x.bfloat16(), gy.bfloat16())
    y, gx = run_parallel(par, strategy, x.bfloat16(), gy.bfloat16())
    grads = odysseus.dense_state_dict(par, grad=True)
    pairs = [("output", y, y16, y64), ("x.grad", gx, gx16, gx64)] + [(k, grads[k], gw16[k], gw64[k]) for k in gw64]
    for name, ours, base, truth in pairs:
        e_ours, e_base = rel_err(ours, truth), rel_err(base, truth)
        assert e_ours <= 3 * e_base + 1e-3, f"{strategy} symm {name}: bf16 error {e_ours:.2e} vs {e_base:.2e}"
    return True


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("strategy", ["tp-sp", "odysseus"])
def test_symm_parity_bf16_numerics(strategy, world):
    assert all(run_ranks(world, _symm_bf16, strategy, start_method="spawn", timeout=300))


def _symm_reuse(rank, world):
    """Calls with different lengths, and two modules sharing the group's buffers, stay correct."""
    torch.cuda.set_device(0)
    ref = make_block(torch.float32, **ODD).cuda()
    a = odysseus.parallelize(ref.self_attn, "odysseus", backend="symm")
    b = odysseus.parallelize(ref.mlp, "tp-sp", backend="symm")
    for L in (61, 16, 200, 33):
        x = torch.randn(1, L, 96, generator=torch.Generator().manual_seed(L)).cuda()
        got = odysseus.gather_sequence(b(a(odysseus.shard_sequence(x))))
        want = ref.mlp(ref.self_attn(x))
        assert rel_err(got, want) < 1e-2, (L, rel_err(got, want))
    return True


def test_symm_buffer_reuse_and_sharing():
    assert all(run_ranks(2, _symm_reuse, start_method="spawn", timeout=300))


def _silent_peer(rank, world):
    """A source that never signals becomes a TimeoutError naming the rank and the source."""
    import odykernels
    from odysseus.comm import resolve_group
    from odysseus.overlap import symm

    torch.cuda.set_device(0)
    pg = resolve_group()
    ws = symm._workspace(pg, "timeout-test", 2 * 8 * 8, torch.float32, torch.device("cuda"))
    recv = ws.data[: 2 * 8 * 8].view(2, 8, 8)
    try:
        odykernels.reduce_slots(recv, ws.flags, [8, 8], rank, epoch=123, max_polls=1000)
    except TimeoutError as e:
        return str(e)
    return None


def test_silent_peer_times_out():
    for rank, msg in enumerate(run_ranks(2, _silent_peer, start_method="spawn", timeout=300)):
        assert msg is not None and f"rank {rank}" in msg and "source" in msg, msg
