"""The symm backend on CUDA: several ranks share one GPU (TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1).

Ranks are spawned (CUDA cannot fork) and talk over gloo (NCCL refuses two ranks on one device); symmetric
memory rendezvous goes through the store. fp32 runs with TF32 off, so the tolerance is the CPU tests' 1e-5.
Marked gpu: skipped without CUDA, run by perf/gpu_check.sh.
"""

import pytest
import torch
from helpers import (
    ODD,
    assert_low_precision_within,
    assert_runs_close,
    make_block,
    rel_err,
    run_parallel,
    run_reference,
)
from multirank import run_ranks

import odysseus
from odysseus.comm import resolve_group, shard_sizes

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _overlapping_devices(monkeypatch):
    monkeypatch.setenv("TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES", "1")


def _setup():
    torch.cuda.set_device(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _check_parity(ref, strategy, B, L, dtype=torch.float32):
    par = odysseus.parallelize(ref, strategy, backend="symm")
    g = torch.Generator().manual_seed(L)
    x = torch.randn(B, L, ref.config.hidden_size, generator=g, dtype=torch.float64).cuda()
    gy = torch.randn(B, L, ref.config.hidden_size, generator=g, dtype=torch.float64).cuda()
    want = run_reference(ref, x.to(dtype), gy.to(dtype))
    assert_runs_close(run_parallel(par, x.to(dtype), gy.to(dtype)), want, f"{strategy} L={L}")
    ref.zero_grad()


def _parity(rank, world):
    """fp32 parity of both strategies, every gradient; lengths that shrink and grow; auto picks symm."""
    _setup()
    import odykernels.signal as signal
    from odysseus import overlap

    reads = []
    real_read = signal.read_status
    signal.read_status = lambda status: reads.append(1) or real_read(status)
    ref = make_block(torch.float32, **ODD).cuda()  # 6 heads, 2 kv heads: shared kv at world 3 and 4
    for strategy in ("tp-sp", "odysseus"):
        for L in (61, 16, 200, 33):
            _check_parity(ref, strategy, 2, L)
    assert len(reads) == 2 * 2 * 4, f"status read {len(reads)} times: expected once per finalize_grads"
    pg = resolve_group()
    assert overlap.resolve_backend("auto", pg, torch.device("cuda", 0), torch.bfloat16) == "symm"
    return True


@pytest.mark.parametrize("world", [2, 3, 4])
def test_symm_gpu_parity_fp32_numerics(world):
    assert all(run_ranks(world, _parity, start_method="spawn", timeout=400))


def _bf16(rank, world):
    """bf16: our error against fp64 within 3x the reference's own bf16 error."""
    _setup()
    ref64 = make_block(torch.float64, **ODD).cuda()
    ref16 = make_block(torch.bfloat16, **ODD).cuda()
    for strategy in ("tp-sp", "odysseus"):
        par = odysseus.parallelize(ref16, strategy, backend="symm")
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 61, 96, generator=g, dtype=torch.float64).cuda()
        gy = torch.randn(2, 61, 96, generator=g, dtype=torch.float64).cuda()
        truth = run_reference(ref64, x, gy)
        base = run_reference(ref16, x.bfloat16(), gy.bfloat16())
        assert_low_precision_within(run_parallel(par, x.bfloat16(), gy.bfloat16()), base, truth, f"{strategy} symm")
        ref16.zero_grad()
        ref64.zero_grad()
    return True


def test_symm_gpu_parity_bf16_numerics():
    assert all(run_ranks(3, _bf16, start_method="spawn", timeout=400))


def _stress(rank, world):
    """Long sequences, many epochs, pulls held back 1 ms each so they finish well after the GEMM started."""
    _setup()
    from odysseus.overlap import ag_matmul, matmul_rs
    from odysseus.overlap.transport import transport_for

    transport_for(torch.device("cuda", 0)).delay_s = 1e-3
    pg = resolve_group()
    B, L, K, N = 1, 16384 + 3, 1024, 1536
    sizes = shard_sizes(L, world)
    g = torch.Generator(device="cuda").manual_seed(rank)
    for call in range(24):
        x = torch.randn(B, sizes[rank], K, device="cuda", generator=g)
        w = torch.randn(K, N, device="cuda", generator=g) / K**0.5
        got, want = ag_matmul(x, w, sizes, pg, "symm"), ag_matmul(x, w, sizes, pg, "naive")
        assert rel_err(got, want) < 1e-5, f"call {call}: ag_matmul {rel_err(got, want):.2e}"
        xr = torch.randn(B, L, N, device="cuda", generator=g)
        got, want = matmul_rs(xr, w.t(), sizes, pg, "symm"), matmul_rs(xr, w.t(), sizes, pg, "naive")
        assert rel_err(got, want) < 1e-5, f"call {call}: matmul_rs {rel_err(got, want):.2e}"
    odysseus.check_overlap()
    return True


def test_symm_gpu_stress_late_copies_many_epochs_numerics():
    assert all(run_ranks(2, _stress, start_method="spawn", timeout=400))


def _silent_producer(rank, world):
    """After a good call, rank 1's producer never runs: every reduction times out naming source 1."""
    _setup()
    import odykernels
    from odysseus.overlap import matmul_rs, symm

    symm.TIMEOUT_S = 1.0
    pg = resolve_group()
    sizes = shard_sizes(64, world)
    x, w = torch.randn(2, 64, 32, device="cuda"), torch.randn(32, 48, device="cuda")
    matmul_rs(x, w, sizes, pg, "symm")
    odysseus.check_overlap()
    if rank == 1:
        odykernels.prepare_matmul_rs = lambda *a, **k: odykernels._runtime.Launch(None, torch.device("cuda", 0))
    matmul_rs(x, w, sizes, pg, "symm")
    try:
        odysseus.check_overlap()
    except TimeoutError as err:
        return str(err)
    return None


def test_symm_gpu_silent_producer_times_out():
    for rank, msg in enumerate(run_ranks(2, _silent_producer, start_method="spawn", timeout=300)):
        assert msg is not None and f"rank {rank} timed out waiting for source 1" in msg, msg


def _dead_peer_barrier(rank, world):
    """After a good call, rank 1 never reaches the next: rank 0's barrier times out, and its process lives on."""
    _setup()
    from odysseus.overlap import ag_matmul, symm

    symm.TIMEOUT_S = 1.0
    pg = resolve_group()
    sizes = shard_sizes(64, world)
    x, w = torch.randn(2, sizes[rank], 32, device="cuda"), torch.randn(32, 48, device="cuda")
    ag_matmul(x, w, sizes, pg, "symm")
    odysseus.check_overlap()
    if rank == 1:  # hung, not gone: its memory stays mapped while rank 0 gives up
        import time

        time.sleep(10)
        return None
    ag_matmul(x, w, sizes, pg, "symm")
    try:
        odysseus.check_overlap()
    except TimeoutError as err:
        alive = (torch.ones(4, device="cuda") * 2).sum().item()  # no device trap: the context still works
        return str(err), alive
    return None


def test_symm_gpu_dead_peer_barrier_times_out_without_trap():
    msg, alive = run_ranks(2, _dead_peer_barrier, start_method="spawn", timeout=300)[0]
    assert "rank 0 timed out on channel 0 waiting for rank 1 to arrive" in msg, msg
    assert alive == 8.0
