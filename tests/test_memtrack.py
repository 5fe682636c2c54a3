"""odysseus.training.memtrack: the tracker sees every allocation and free (views, in-place ops, storage resizes, the
inside of odysseus custom ops), and what it measures of a block is what odysseus.plan's closed forms say."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import ODD
from multirank import run_ranks

import odysseus
from odysseus import finalize_grads, shard_sequence
from odysseus.comm import shard_sizes
from odysseus.overlap import Ring, ag_matmul
from odysseus.plan import Case, block_peak, saved_activation_bytes
from odysseus.plan.overlap_memory import gather_held_bytes
from odysseus.reference import TransformerBlock, init_weights
from odysseus.strategies.registry import VARIANTS
from odysseus.training.memtrack import MemoryTracker, step_memory


def _probe_impl(x: torch.Tensor) -> torch.Tensor:
    scratch = torch.ones(1000, dtype=torch.float32)  # 4000 bytes that live only inside the op
    return x + scratch.sum()


# The same op inside and outside the odysseus namespace: the tracker follows only the former inside.
probe = torch.library.custom_op("odysseus::memtrack_probe", _probe_impl, mutates_args=())
foreign = torch.library.custom_op("memtrack_test::probe", _probe_impl, mutates_args=())
for op in (probe, foreign):
    op.register_fake(lambda x: torch.empty_like(x))


def test_counts_allocations_and_frees_not_views_or_in_place_ops():
    before = torch.zeros(100)  # exists at the start: never counted
    with MemoryTracker() as mem:
        a = torch.empty(256)  # 1024 bytes
        v = a.view(16, 16).t()
        a.add_(1)
        before.mul_(2)
        b = torch.empty(512, dtype=torch.bfloat16)  # 1024 more: the peak
        del b
        c = v * 2  # a new 1024-byte tensor
        del a, v  # the storage goes only with its last view
    assert (mem.peak_bytes, mem.live_bytes) == (2048, 1024), (mem.peak_bytes, mem.live_bytes)
    assert c.numel() == 256


def test_storage_resizes_count_and_the_patch_is_removed():
    s = torch.empty(0).untyped_storage()
    with MemoryTracker() as mem:
        s.resize_(4096)  # FSDP2 gathers into its unsharded parameters this way
        grown = mem.live_bytes
        s.resize_(0)
    assert (grown, mem.peak_bytes, mem.live_bytes) == (4096, 4096, 0)
    assert "resize_" not in vars(torch.UntypedStorage)


def test_sees_inside_odysseus_custom_ops_only():
    x = torch.zeros(8)
    with MemoryTracker() as inside:
        probe(x)
    with MemoryTracker() as outside:
        foreign(x)
    assert inside.peak_bytes >= 4000 + 32, inside.peak_bytes
    assert outside.peak_bytes < 4000, outside.peak_bytes  # what a plain TorchDispatchMode would report


def test_one_tracker_at_a_time_and_phases():
    with MemoryTracker() as mem:
        with pytest.raises(RuntimeError, match="already active"):
            with MemoryTracker():
                pass
        with mem.phase("a"):
            t = torch.empty(100)
        del t
        with mem.phase("b"):
            u = torch.empty(10)
    assert mem.phase_peaks == {"a": 400, "b": 40} and mem.peak_op == "a:empty" and u.numel() == 10


def _block_peaks(rank, world, modes):
    ref = init_weights(TransformerBlock(odysseus.TransformerConfig(**ODD))).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 61, ODD["hidden_size"], generator=g, dtype=torch.bfloat16)
    out = []
    for v in VARIANTS:
        for mode in modes if v.spec.overlapped else modes[:1]:
            par = odysseus.parallelize(ref, v.spec.name, backend="pipelined", save_input=mode)
            if v.zero3:
                par = odysseus.zero3(par)
            # Its own storage, as a layer input in a model is (a shard_sequence view would hold the whole x).
            xin = (shard_sequence(x) if v.spec.sequence_split else x).detach().clone().requires_grad_()
            dy = torch.randn(xin.shape, generator=g, dtype=xin.dtype)
            par(xin).backward(dy)  # lazy initialisation happens outside the measured step
            par.zero_grad(set_to_none=True)
            xin.grad = None
            out.append((v.name, mode, step_memory(par, xin, dy, finalize_grads)))
    return out


@pytest.mark.parametrize("world", [1, 3])
def test_block_peak_is_the_closed_form(world):
    """Odd shapes (61 tokens over 3 ranks, 6 heads, a kv head shared), batch 2, bf16, every strategy with and
    without ZeRO-3, both save_input modes: saved bytes exactly, the peak within 5%."""
    cfg = odysseus.TransformerConfig(**ODD)
    for rank, rows in enumerate(run_ranks(world, _block_peaks, ("gathered", "shard"))):
        for name, mode, m in rows:
            case = Case(name, cfg, 2, 61, world, rank, 2, save_input=mode)
            if not case.variant.zero3:  # FSDP2's gathered weights look saved to SavedActivations, then are freed
                assert m.saved == saved_activation_bytes(case), (name, mode, rank)
            want = block_peak(case, "pipelined")
            assert abs(want.bytes / m.peak - 1) <= 0.05, (name, mode, rank, m.peak, m.peak_op, want)


def _gather_transient(rank, world, B, mode, ring):
    L, K, N = 37, 24, 16
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(B, shard_sizes(L, world)[rank], K, generator=g, dtype=torch.bfloat16)
    w = torch.randn(K, N, generator=g, dtype=torch.bfloat16, requires_grad=True)
    sizes = shard_sizes(L, world)
    with MemoryTracker() as mem:
        y = ag_matmul(x, w, sizes, dist.group.WORLD, "pipelined", "t", save_input=mode, ring=ring)
    return mem.peak_bytes - y.numel() * y.element_size(), mem.live_bytes - y.numel() * y.element_size()


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("ring", [Ring(), Ring(tokens=3, slots=1), Ring(tokens=2, slots=3)], ids=str)
def test_shard_mode_all_gather_matmul_holds_only_the_ring(B, ring):
    """With save_input="shard" an all-gather⊗GEMM's transient is its ring's slots (and, for B > 1, the
    sequence-major copy of this rank's shard), whatever L is, and nothing stays; "gathered" keeps the
    gathered input."""
    world, L, K = 3, 37, 24
    cfg = odysseus.TransformerConfig(hidden_size=K, num_heads=3, intermediate_size=48)
    for rank, (transient, kept) in enumerate(run_ranks(world, _gather_transient, B, "shard", ring)):
        case = Case("tp-sp", cfg, B, L, world, rank, 2, "shard", ring.tokens, ring.slots)
        assert transient == gather_held_bytes(case, K, "pipelined")[0] and kept == 0, (rank, transient, kept)
    for rank, (transient, kept) in enumerate(run_ranks(world, _gather_transient, B, "gathered", ring)):
        assert transient == kept == B * L * K * 2, (rank, transient, kept)


def _settled(rank, world):
    from odysseus.comm import primitives
    from odysseus.training.memtrack import settled_collectives

    originals = (dist.all_reduce, primitives.all_gather_tensor)
    t = torch.full((4,), float(rank + 1))
    out = torch.empty(8)
    with settled_collectives():
        assert dist.all_reduce is not originals[0]
        dist.all_reduce(t)
        primitives.all_gather_tensor(out, t)
    return t.tolist(), out.tolist(), (dist.all_reduce, primitives.all_gather_tensor) == originals


def test_settled_collectives_compute_the_same_and_are_unwrapped_after():
    for t, out, restored in run_ranks(2, _settled):
        assert t == [3.0] * 4 and out == [3.0] * 8 and restored
