"""Bad input, table-driven: every wrong call raises the expected error type with a message naming the value.

Each row runs on ranks (gloo, forked) at a world size from 1 to 4 and checks the error on every rank.
"""

import pytest
import torch
from helpers import ODD, STRATEGY_BACKENDS, assert_close, local_input, make_block
from multirank import run_ranks

import odysseus
from odysseus import ParallelBlock, TransformerConfig, shard_sequence

CFG = TransformerConfig(**ODD)


def _seq_input(strategy, world_input=None, L=61, dtype=torch.float32):
    x = torch.randn(2, L, 96, dtype=dtype)
    return local_input(strategy, x)


def wrong_rank(strategy):
    return odysseus.parallelize(make_block(), strategy)(_seq_input(strategy)[0])


def hidden_mismatch(strategy):
    return odysseus.parallelize(make_block(), strategy)(_seq_input(strategy)[..., :64])


def dtype_mismatch(strategy):
    return odysseus.parallelize(make_block(), strategy)(_seq_input(strategy).double())


def wrong_device(strategy):
    return odysseus.parallelize(make_block(), strategy)(_seq_input(strategy).to("meta"))


def nan_input(strategy):
    par = odysseus.parallelize(make_block(), strategy, check_finite=True)
    x = _seq_input(strategy)
    x[0, 0, 0] = float("nan")
    return par(x)


def inf_in_ffn_only(strategy):
    x = _seq_input(strategy)
    x[-1, -1, -1] = float("inf")
    return odysseus.parallelize(make_block().mlp, strategy, check_finite=True)(x)


def unknown_strategy(strategy):
    return odysseus.parallelize(make_block(), strategy + "-x")


def unknown_backend(strategy):
    return odysseus.parallelize(make_block(), strategy, backend="nccl")


def already_parallel(strategy):
    return odysseus.parallelize(odysseus.parallelize(make_block(), strategy), strategy)


def group_size_mismatch(strategy):
    # Shards built for this world loaded into a module for a world twice as large.
    import torch.distributed as dist

    small = odysseus.parallelize(make_block(), strategy)
    sub = dist.new_group([dist.get_rank()])
    other = ParallelBlock(CFG, strategy, group=sub)
    return small.load_state_dict(other.state_dict())


def too_many_ranks_for_heads(strategy):
    cfg = TransformerConfig(hidden_size=16, num_heads=1, num_kv_heads=1, intermediate_size=8)
    return ParallelBlock(cfg, strategy)


def heads_not_divisible_by_kv(strategy):
    return TransformerConfig(hidden_size=96, num_heads=6, num_kv_heads=4, intermediate_size=8)


def shard_of_wrong_length(strategy):
    import torch.distributed as dist

    x = torch.randn(2, 20 + dist.get_rank(), 96)  # ranks hold 20, 21, 22...: not shard_sequence's split
    return odysseus.parallelize(make_block(), strategy)(x)


def full_sequence_on_sharded_positions(strategy):
    par = odysseus.parallelize(make_block(), strategy)
    x = _seq_input(strategy)
    return par(x, torch.arange(61))  # positions of the full sequence with a shard


def position_ids_wrong_batch(strategy):
    x = _seq_input(strategy)
    return odysseus.parallelize(make_block(), strategy)(x, torch.zeros(3, x.shape[1], dtype=torch.long))


def float_position_ids(strategy):
    x = _seq_input(strategy)
    return odysseus.parallelize(make_block(), strategy)(x, torch.zeros(x.shape[1]))


def fewer_tokens_than_ranks(strategy):
    return shard_sequence(torch.randn(1, 1, 96)) if strategy != "tp" else shard_sequence(torch.randn(1, 0, 96))


def sequence_dim_out_of_range(strategy):
    return shard_sequence(torch.randn(2, 8, 96), dim=5)


# (call, strategies, worlds, error type, phrase that must appear on every rank where it raises)
ALL = odysseus.STRATEGIES
SPLIT = ("tp-sp", "ulysses", "odysseus")
ROWS = [
    (wrong_rank, ALL, (1, 2, 3), ValueError, "expected x of shape (batch, seq, hidden), got 2 dims"),
    (hidden_mismatch, ALL, (1, 3), ValueError, "expected hidden size 96, got x.shape[-1]=64"),
    (dtype_mismatch, ALL, (1, 2), TypeError, "input dtype torch.float64 does not match weight dtype torch.float32"),
    (wrong_device, ALL, (1, 2), ValueError, "input is on meta but the weights are on cpu"),
    (nan_input, ALL, (1, 2, 3, 4), ValueError, "holds NaN or Inf on rank"),
    (inf_in_ffn_only, ("tp", "odysseus"), (1,), ValueError, "holds NaN or Inf on rank 0"),
    (unknown_strategy, ALL, (1,), ValueError, "expected one of ('tp', 'tp-sp', 'ulysses', 'odysseus')"),
    (unknown_backend, ALL, (1,), ValueError, "unknown overlap backend 'nccl'; expected one of ('auto'"),
    (already_parallel, ALL, (2,), TypeError, "is already parallelized"),
    (group_size_mismatch, ("tp", "tp-sp", "odysseus"), (2,), RuntimeError, "size mismatch for self_attn.q_proj"),
    (too_many_ranks_for_heads, ALL, (2, 4), ValueError, "cannot split num_heads=1 over world size"),
    (heads_not_divisible_by_kv, ALL[:1], (1,), ValueError, "num_heads=6 is not divisible by num_kv_heads=4"),
    (shard_of_wrong_length, SPLIT, (2, 3, 4), ValueError, "but shard_sequence splits a sequence of"),
    (full_sequence_on_sharded_positions, SPLIT, (2, 3), ValueError, "do not match the input: expected"),
    (position_ids_wrong_batch, ALL, (1, 2), ValueError, "position_ids of shape (3,"),
    (float_position_ids, ALL, (1,), TypeError, "position_ids must be an integer tensor, got dtype torch.float32"),
    (fewer_tokens_than_ranks, ALL, (2, 4), ValueError, "tokens cannot be split over"),
    (sequence_dim_out_of_range, ALL[:1], (1,), ValueError, "dim=5 is out of range for a tensor with 3 dims"),
]
CASES = [(f, s, w, e, p) for f, strategies, worlds, e, p in ROWS for s in strategies for w in worlds]


def _raise(rank, world, call, strategy, exc, phrase):
    with pytest.raises(exc) as info:
        call(strategy)
    assert phrase in str(info.value), f"rank {rank}: {info.value!r} lacks {phrase!r}"
    return str(info.value)


@pytest.mark.parametrize(
    "call, strategy, world, exc, phrase", CASES, ids=[f"{c[0].__name__}-{c[1]}-w{c[2]}" for c in CASES]
)
def test_bad_input(call, strategy, world, exc, phrase):
    if call is fewer_tokens_than_ranks and strategy == "tp" and world > 1:
        phrase = "a sequence of 0 tokens cannot be split over"
    run_ranks(world, _raise, call, strategy, exc, phrase, timeout=60, pg_timeout=20)


def _non_contiguous(rank, world, strategy, backend):
    """A non-contiguous input gives what its contiguous copy gives, up to fp32 rounding of other GEMM paths."""
    par = odysseus.parallelize(make_block(), strategy, backend=backend)
    base = torch.randn(96, 61, 2).permute(2, 1, 0)  # (2, 61, 96), not contiguous
    x = local_input(strategy, base)
    x = x if x.is_contiguous() is False else x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not x.is_contiguous()
    assert_close(par(x), par(x.contiguous()), 1e-6, 1e-6, f"{strategy} non-contiguous", scaled=True)
    return True


@pytest.mark.parametrize("strategy, backend", STRATEGY_BACKENDS)
def test_non_contiguous_input_is_handled(strategy, backend):
    assert all(run_ranks(3, _non_contiguous, strategy, backend))
