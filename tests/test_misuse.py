"""Common mistakes that used to give silently wrong numbers or hang now raise, on every rank at once:
DDP over the sequence group, the full sequence fed to every rank, shards fed to TP, a check that fails on
one rank only. Every case runs on forked gloo ranks and checks the error on each of them; the process-group
timeout is short, so a rank left waiting fails the test in seconds instead of hanging."""

import pytest
import torch
import torch.distributed as dist
from helpers import EVEN, ODD, assert_close, make_block
from multirank import run_ranks
from test_hf_numerics import batch, tiny_llama
from torch.nn.parallel import DistributedDataParallel as DDP

import odysseus
from odysseus import STRATEGIES, shard_sequence
from odysseus.integrations.hf import parallelize_llama
from odysseus.strategies import registry

SPLIT = [s for s in STRATEGIES if registry.get(s).sequence_split]
TOL = dict(rtol=1e-5, atol=1e-5, scaled=True)
FAST = dict(timeout=90, pg_timeout=15)  # a rank left waiting dies in 15 s, not at the default 120 s


def _expect(error, phrase, call):
    with pytest.raises(error) as info:
        call()
    assert phrase in str(info.value), f"rank {dist.get_rank()}: {info.value!r} lacks {phrase!r}"
    return str(info.value)


def _x(L=61, hidden=96, seed=0):
    return torch.randn(2, L, hidden, generator=torch.Generator().manual_seed(seed))


# --- (a) DistributedDataParallel over the sequence / tensor group ------------------------------------------


def _ddp_same_group(rank, world, strategy):
    # Even shapes, so that DDP's own check of equal parameter shapes passes and it broadcasts rank 0's shards.
    par = odysseus.parallelize(make_block(**EVEN), strategy)
    model = DDP(par)
    x = _x(64, 64)
    return _expect(ValueError, "2-D DeviceMesh", lambda: model(x if strategy == "tp" else shard_sequence(x)))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ddp_over_the_model_group_raises_on_every_rank(strategy, world):
    messages = run_ranks(world, _ddp_same_group, strategy, **FAST)
    assert all("inside DistributedDataParallel" in m for m in messages)


def _ddp_llama(rank, world):
    model = DDP(parallelize_llama(tiny_llama(), "odysseus"))  # what Trainer and accelerate do
    ids, _ = batch()
    return _expect(ValueError, "2-D DeviceMesh", lambda: model(shard_sequence(ids)))


def test_ddp_around_parallelize_llama_raises_on_every_rank():
    run_ranks(2, _ddp_llama, **FAST)


def _ddp_on_a_2d_mesh(rank, world, strategy):
    """The right way: DDP over 'dp', odysseus over 'sp' (2 x 2): no error, the dense block's numbers."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    ref = make_block(**ODD)
    par = odysseus.parallelize(ref, strategy, mesh["sp"])
    model = DDP(par, process_group=mesh["dp"].get_group())
    sp = mesh["sp"].get_group()
    x, gy = _x(61), _x(61, seed=1)  # both data-parallel replicas see the same batch: DDP's mean is the sum
    split = strategy != "tp"
    y = model(shard_sequence(x, sp) if split else x)
    (y * (shard_sequence(gy, sp) if split else gy)).sum().backward()
    odysseus.finalize_grads(par)
    ref(x).backward(gy)
    full = odysseus.gather_sequence(y.detach(), sp) if split else y.detach()
    assert_close(full, ref(x).detach(), **TOL, what=f"{strategy} on a 2-D mesh")
    grads = odysseus.dense_state_dict(par, grad=True)
    for name, p in ref.named_parameters():
        assert_close(grads[name], p.grad, **TOL, what=f"{strategy} {name}.grad on a 2-D mesh")
    return True


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ddp_over_the_data_parallel_dim_of_a_2d_mesh_runs_numerics(strategy):
    assert all(run_ranks(4, _ddp_on_a_2d_mesh, strategy, **FAST))


# --- (b) the full sequence fed to every rank of a sequence-split model (check_inputs=True) ------------------


def _full_sequence(rank, world):
    messages = []
    for strategy in SPLIT:
        ref = make_block()
        par = odysseus.parallelize(ref, strategy, check_inputs=True)
        x = _x()
        # [61] * world is a valid split of 61 * world tokens: only the inputs' contents tell the mistake.
        messages.append(_expect(ValueError, "every rank holds the same 61 tokens", lambda: par(x)))  # noqa: B023 - called at once
        y = par(shard_sequence(x))  # the right input passes the check and gives the dense numbers
        assert_close(odysseus.gather_sequence(y.detach()), ref(x).detach(), **TOL, what=f"{strategy} checked")
    return messages


@pytest.mark.parametrize("world", [2, 3, 4])
def test_full_sequence_on_every_rank_raises_with_check_inputs(world):
    run_ranks(world, _full_sequence, **FAST)


def _full_ids_llama(rank, world, strategy):
    model = parallelize_llama(tiny_llama(), strategy, check_inputs=True)
    ids, _ = batch()
    _expect(ValueError, "every rank holds the same", lambda: model(ids))
    logits = model(shard_sequence(ids)).logits  # and the shard passes
    return logits.shape[1]


@pytest.mark.parametrize("strategy", SPLIT)
def test_full_input_ids_on_every_rank_raise_with_check_inputs(strategy):
    assert run_ranks(3, _full_ids_llama, strategy, **FAST) == [21, 20, 20]


def _shards_to_tp(rank, world, L):
    par = odysseus.parallelize(make_block(), "tp", check_inputs=True)
    x = _x(L)
    _expect(ValueError, "the ranks hold different inputs", lambda: par(shard_sequence(x)))
    return torch.equal(par(x), par(x))  # the same full sequence everywhere passes


def test_equal_length_shards_fed_to_tp_raise_with_check_inputs():
    assert all(run_ranks(3, _shards_to_tp, 60, **FAST))  # 60 tokens: shards of 20, 20, 20


# --- (c) shards of different lengths fed to TP: a clear error before any collective -------------------------


def _uneven_to_tp(rank, world):
    par = odysseus.parallelize(make_block(), "tp")
    x = shard_sequence(_x())
    return _expect(ValueError, "a tensor-parallel ('tp') module takes the whole sequence", lambda: par(x))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_uneven_shards_fed_to_tp_raise_on_every_rank(world):
    messages = run_ranks(world, _uneven_to_tp, **FAST)
    assert all("lengths [" in m for m in messages)


# --- (d) checks that fail on one rank only ----------------------------------------------------------------


def _mask_on_one_rank(rank, world, strategy):
    model = parallelize_llama(tiny_llama(), strategy)
    ids, _ = batch()
    local = ids if strategy == "tp" else shard_sequence(ids)
    mask = torch.ones_like(local)
    if rank == world - 1:
        mask[0, -3:] = 0  # right padding on the last rank only
    msg = _expect(ValueError, "3 masked (padding) tokens", lambda: model(local, attention_mask=mask))
    assert f"rank(s) [{world - 1}]" in msg, msg
    return True


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("strategy", ["tp", "odysseus"])
def test_padding_mask_on_one_rank_raises_on_every_rank(strategy, world):
    assert all(run_ranks(world, _mask_on_one_rank, strategy, **FAST))


def _positions_fit_one_shard(rank, world, strategy):
    par = odysseus.parallelize(make_block(), strategy)
    x = shard_sequence(_x())  # 61 tokens: rank 0 holds 31 (world 2) or 21 (world 3)
    positions = torch.arange(61 // world + 1)  # the length of rank 0's shard: wrong everywhere else
    return _expect(ValueError, "do not match the input", lambda: par(x, positions))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("strategy", SPLIT)
def test_position_ids_wrong_on_some_ranks_raise_on_every_rank(strategy, world):
    messages = run_ranks(world, _positions_fit_one_shard, strategy, **FAST)
    assert all(f"rank(s) {list(range(1, world))}" in m for m in messages), messages


def _nan_on_one_rank(rank, world, strategy):
    par = odysseus.parallelize(make_block(), strategy, check_finite=True)
    x = _x() if strategy == "tp" else shard_sequence(_x())
    if rank == 1:
        x[0, 0, 0] = float("nan")
    return _expect(ValueError, "holds NaN or Inf on rank 1", lambda: par(x))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_on_one_rank_raises_on_every_rank(strategy):
    run_ranks(3, _nan_on_one_rank, strategy, **FAST)


# --- the checks cost one host exchange per module call, as the registry says ------------------------------


def _exchanges(rank, world):
    counts = {}
    for strategy in STRATEGIES:
        par = odysseus.parallelize(make_block(), strategy)
        x = _x() if strategy == "tp" else shard_sequence(_x())
        with odysseus.CommLedger() as ledger:
            par(x)
        counts[strategy] = len(ledger.select(category="metadata", label="lengths"))
    return counts


def test_length_exchanges_per_block_match_the_registry():
    counts = run_ranks(2, _exchanges)[0]
    assert counts == {s: registry.get(s).length_exchanges for s in STRATEGIES}
