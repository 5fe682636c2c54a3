"""Loud by default (issue 22): frozen weights stay frozen; misfed inputs, batch mismatches and per-rank weights
raise on every rank without opting in; a ZeRO-3 model refuses deepcopy with a recipe. Forked gloo ranks at
world 2 and 3; every error is checked on each rank."""

import copy

import pytest
import torch
import torch.distributed as dist
from helpers import assert_close, local_input, make_block
from multirank import run_ranks
from test_hf_numerics import batch, tiny_llama

import odysseus
from odysseus import STRATEGIES, shard_sequence
from odysseus.comm.prints import MIN_TOKENS
from odysseus.integrations.hf import causal_lm_loss, finalize_model_grads, parallelize_llama
from odysseus.strategies import registry

SPLIT = [s for s in STRATEGIES if registry.get(s).sequence_split]
FAST = dict(timeout=120, pg_timeout=20)  # a rank left waiting dies in 20 s, not at the default 120 s
TOL = dict(rtol=1e-5, atol=1e-5, scaled=True)
FROZEN = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight")


def _expect(error, phrase, call):
    with pytest.raises(error) as info:
        call()
    assert phrase in str(info.value), f"rank {dist.get_rank()}: {info.value!r} lacks {phrase!r}"
    return str(info.value)


def _x(L=61, seed=0, B=2, hidden=96):
    return torch.randn(B, L, hidden, generator=torch.Generator().manual_seed(seed))


# --- 1. frozen stays frozen ---------------------------------------------------------------------------------


def _train_frozen(rank, world, when, zero3):
    return all(_frozen_step(strategy, when, zero3) for strategy in STRATEGIES)


def _frozen_step(strategy, when, zero3):
    ref = make_block()
    for name in FROZEN:
        ref.get_parameter(name).requires_grad_(False)
    par = odysseus.parallelize(make_block() if when == "after" else ref, strategy)
    if zero3 == "before":
        odysseus.zero3(par)
    if when == "after":
        for name, p in par.named_parameters():
            p.requires_grad_(name not in FROZEN)
    if zero3 == "after":
        odysseus.zero3(par)
    flags = {n: p.requires_grad for n, p in par.named_parameters()}
    assert flags == {n: n not in FROZEN for n in flags}, flags
    before = odysseus.dense_state_dict(par)
    x, gy = _x(), _x(seed=1)
    (par(local_input(strategy, x)) * local_input(strategy, gy)).sum().backward()
    odysseus.finalize_grads(par)
    ref(x).backward(gy)
    grads = odysseus.dense_state_dict(par, grad=True)
    assert set(grads) == {n for n, p in ref.named_parameters() if p.requires_grad}, sorted(grads)
    for name, g in grads.items():
        assert_close(g, ref.get_parameter(name).grad, **TOL, what=f"{strategy} {name}.grad")
    torch.optim.AdamW(par.parameters(), lr=1e-2, weight_decay=0.1).step()
    after = odysseus.dense_state_dict(par)
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == (name not in FROZEN), f"{strategy}: {name} moved={moved}"
    return True


# (when the weights are frozen: before or after parallelize; ZeRO-3: none, before or after that freezing)
FREEZE_CASES = [("before", None), ("after", None), ("before", "after"), ("after", "before"), ("after", "after")]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("when,zero3", FREEZE_CASES)
def test_frozen_weights_stay_frozen(when, zero3, world):
    assert all(run_ranks(world, _train_frozen, when, zero3, **FAST))


def _llama_frozen(rank, world, strategy):
    model = tiny_llama()
    frozen = {n for n, _ in model.named_parameters() if ".layers.0." in n or "embed" in n}
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)  # load, freeze, wrap
    parallelize_llama(model, strategy)
    wrong = [n for n, p in model.named_parameters() if p.requires_grad == (n in frozen)]
    assert not wrong, wrong
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, labels = batch()
    causal_lm_loss(model(local_input(strategy, ids)).logits, labels).backward()
    finalize_model_grads(model)
    torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1).step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert moved == set(before) - frozen, sorted(moved ^ (set(before) - frozen))
    return True


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_frozen_llama_layers_stay_frozen(strategy):
    assert all(run_ranks(3, _llama_frozen, strategy, **FAST))


# --- 2. misfed inputs raise by default ----------------------------------------------------------------------


def _misfeeds(rank, world):
    x = _x()
    for strategy in SPLIT:
        par = odysseus.parallelize(make_block(), strategy)
        _expect(ValueError, "every rank holds the same 61 tokens", lambda: par(x))  # noqa: B023 - called at once
        # Padding (one token repeated) and short shards may repeat on every rank: no error.
        par(torch.zeros(2, 40, 96) + torch.randn(1, 1, 96, generator=torch.Generator().manual_seed(3)))
        par(x[:, : MIN_TOKENS - 1])
        y = par(shard_sequence(x))
        assert_close(odysseus.gather_sequence(y.detach()), make_block()(x).detach(), **TOL, what=strategy)
        off = odysseus.parallelize(make_block(), strategy, check_inputs=False)
        off(x)  # the check is off: the misfeed runs (and gives wrong numbers)
    tp = odysseus.parallelize(make_block(), "tp")
    even = _x(20 * world)
    _expect(ValueError, "the ranks hold different inputs", lambda: tp(shard_sequence(even)))
    other = _x(seed=10 + rank)  # each rank a different sequence of the same length
    _expect(ValueError, "the ranks hold different inputs", lambda: tp(other))
    odysseus.parallelize(make_block(), "tp", check_inputs=False)(other)
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_misfed_inputs_raise_by_default(world):
    assert all(run_ranks(world, _misfeeds, **FAST))


def _llama_misfeeds(rank, world):
    ids, labels = batch()
    for strategy in SPLIT:
        model = parallelize_llama(tiny_llama(), strategy)
        _expect(ValueError, "every rank holds the same", lambda: model(ids))  # noqa: B023 - called at once
        assert model(shard_sequence(ids)).logits.shape[1] == shard_sequence(ids).shape[1]
        parallelize_llama(tiny_llama(), strategy, check_inputs=False)(ids)
    tp = parallelize_llama(tiny_llama(), "tp")
    _expect(ValueError, "the ranks hold different inputs", lambda: tp(ids[:, : 20 * world].chunk(world, 1)[rank]))
    other = torch.randint(0, 128, ids.shape, generator=torch.Generator().manual_seed(rank))
    _expect(ValueError, "the ranks hold different inputs", lambda: tp(other))
    skewed = labels.roll(rank, 1)  # the same ids, labels that differ on some ranks
    _expect(ValueError, "the ranks hold different inputs", lambda: tp(ids, labels=skewed))
    moved = torch.arange(ids.shape[1]) + rank  # positions that differ on some ranks
    _expect(ValueError, "the ranks hold different inputs", lambda: tp(ids, position_ids=moved[None]))
    assert tp(ids, labels=labels).loss.isfinite()  # the same inputs everywhere pass
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_misfed_llama_inputs_raise_by_default(world):
    assert all(run_ranks(world, _llama_misfeeds, **FAST))


def _exchanges(rank, world, strategy, check_inputs):
    par = odysseus.parallelize(make_block(), strategy, check_inputs=check_inputs)
    with odysseus.CommLedger() as ledger:
        par(local_input(strategy, _x()))
    return len(ledger.select(category="metadata"))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_default_check_adds_no_exchange(strategy):
    on, off = run_ranks(2, _exchanges, strategy, None, **FAST)[0], run_ranks(2, _exchanges, strategy, False)[0]
    assert on == off == registry.get(strategy).length_exchanges


# --- 3. batch and hidden size in the length exchange --------------------------------------------------------


def _batch_mismatch(rank, world, strategy):
    par = odysseus.parallelize(make_block(), strategy)
    x = local_input(strategy, _x(B=2 + (rank == world - 1)))
    msg = _expect(ValueError, "differ in batch or hidden size", lambda: par(x))
    assert f"rank {world - 1}: (3, " in msg and "rank 0: (2, " in msg, msg
    return True


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_mismatch_raises_on_every_rank(strategy, world):
    assert all(run_ranks(world, _batch_mismatch, strategy, **FAST))


def _hidden_on_one_rank(rank, world, strategy):
    par = odysseus.parallelize(make_block(), strategy)
    x = local_input(strategy, _x(hidden=64 if rank == 1 else 96))
    msg = _expect(ValueError, "expected hidden size 96, got x.shape[-1]=64", lambda: par(x))
    assert "rank(s) [1]" in msg, msg
    return True


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_hidden_mismatch_on_one_rank_raises_on_every_rank(strategy):
    assert all(run_ranks(3, _hidden_on_one_rank, strategy, **FAST))


# --- 4. the same weights on every rank ----------------------------------------------------------------------


def _seeded_per_rank(rank, world):
    for strategy in STRATEGIES:
        ref = make_block(seed=100 + rank)  # each rank its own model, as some DDP scripts do
        msg = _expect(ValueError, "the ranks hold different weights", lambda: odysseus.parallelize(ref, strategy))  # noqa: B023
        assert "'input_layernorm.weight'" in msg and str([tuple([r]) for r in range(world)]) in msg, msg
        odysseus.parallelize(ref, strategy, check_weights=False)  # opted out
    odd = make_block()
    if rank == world - 1:
        with torch.no_grad():
            odd.mlp.up_proj.weight[3, 5] += 1e-3  # one entry on one rank
    msg = _expect(ValueError, "'mlp.up_proj.weight'", lambda: odysseus.parallelize(odd, "odysseus"))
    assert str(tuple(range(world - 1))) in msg, msg
    model = tiny_llama(seed=100 + rank)
    _expect(ValueError, "'model.embed_tokens.weight'", lambda: parallelize_llama(model, "odysseus"))
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_per_rank_weights_raise_on_every_rank(world):
    assert all(run_ranks(world, _seeded_per_rank, **FAST))


def _replica_differs(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    ref = make_block(seed=int(rank == 3))  # rank 3 (replica 1, sp rank 1) holds other weights
    msg = _expect(ValueError, "the ranks hold different weights", lambda: odysseus.parallelize(ref, "odysseus", mesh))
    assert "[(0, 1, 2), (3,)]" in msg, msg  # compared over every rank of the mesh, not within sp alone
    return True


def test_weights_differing_across_replicas_raise_on_every_rank():
    assert all(run_ranks(4, _replica_differs, **FAST))


# --- 6. deepcopy of a ZeRO-3 model --------------------------------------------------------------------------


def _deepcopy_zero3(rank, world, strategy):
    par = odysseus.parallelize(make_block(), strategy)
    ema = odysseus.zero3(copy.deepcopy(par))  # the recipe: deepcopy before zero3, shard the copy too
    odysseus.zero3(par)
    _expect(TypeError, "EMA", lambda: copy.deepcopy(par))
    # The other recipe: a shard-wise EMA of the ZeRO-3 model's parameters, DTensors included.
    shadow = {n: p.detach().clone() for n, p in par.named_parameters()}
    (par(local_input(strategy, _x())) ** 2).sum().backward()
    odysseus.finalize_grads(par)
    torch.optim.SGD(par.parameters(), lr=0.1).step()
    with torch.no_grad():
        for n, p in par.named_parameters():
            shadow[n].lerp_(p.detach(), 0.5)
    want = {
        n: (a + b) / 2
        for (n, a), b in zip(odysseus.dense_state_dict(ema).items(), odysseus.dense_state_dict(par).values())
    }
    for n, p in ema.named_parameters():
        with torch.no_grad():
            p.copy_(shadow[n])
    for n, t in odysseus.dense_state_dict(ema).items():
        assert_close(t, want[n], rtol=1e-6, atol=1e-7, what=f"EMA {n}")
    model = parallelize_llama(tiny_llama(), strategy)
    for layer in model.model.layers:
        odysseus.zero3(layer)
    return _expect(TypeError, "dense_state_dict", lambda: copy.deepcopy(model))


@pytest.mark.parametrize("strategy", ["odysseus", "ulysses"])
def test_deepcopy_of_a_zero3_model_raises_with_the_recipe(strategy):
    run_ranks(2, _deepcopy_zero3, strategy, **FAST)


@pytest.mark.gpu
def test_cuda_print_is_read_one_call_late_without_waiting():
    # On an accelerator the print of a call is read at the next call (after the first call, which waits
    # once), so each forward sends the previous forward's print; the values are the device sums'.
    from odysseus.comm.prints import Fingerprinter, device_print

    xs = [torch.randn(2, 40, 96, device="cuda", generator=torch.Generator("cuda").manual_seed(k)) for k in range(4)]
    want = [[1, *device_print([x]).tolist()] for x in xs]
    fp = Fingerprinter()
    assert fp([xs[0]]) == want[0]  # the first call waits
    assert fp([xs[1]])[0] == 0  # nothing pending yet: not valid, no wait
    torch.cuda.synchronize()
    assert fp([xs[2]]) == want[1]  # the previous call's print
    torch.cuda.synchronize()
    assert fp([xs[3]]) == want[2]
    assert Fingerprinter(sync=True)([xs[3]]) == want[3]
