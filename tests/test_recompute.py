"""Layer checkpointing (with host offload) and the tiled FFN: the same numbers as the plain block, less kept.

Every strategy at worlds 1-4 on the odd shape (hidden 96, 6 heads, 2 kv heads, 61 tokens), against the
single-device reference: output, input gradient and every weight gradient. The ledger sees the collectives
of the recomputed forward under the phase "recompute", and a checkpointed block keeps only its input.
"""

import pytest
import torch
from helpers import ODD, STRATEGY_BACKENDS, assert_runs_close, make_block, run_parallel, run_reference
from multirank import run_ranks

import odysseus
from odysseus import CommLedger, shard_sequence
from odysseus.profiling import SavedActivations


def _parity(rank, world, strategy, backend, options):
    ref = make_block(torch.float32, **ODD)
    par = odysseus.parallelize(ref, strategy, backend=backend, **options)
    g = torch.Generator().manual_seed(5)
    x, gy = torch.randn(2, 61, 96, generator=g), torch.randn(2, 61, 96, generator=g)
    assert_runs_close(run_parallel(par, x, gy), run_reference(ref, x, gy), f"{strategy}/{backend} {options}")
    return True


OPTIONS = {
    "checkpoint": dict(checkpoint=True),
    "offload": dict(checkpoint=True, offload=True),
    "tile5": dict(ffn_tile=5),
    "tile16": dict(ffn_tile=16),
    "all": dict(checkpoint=True, ffn_tile=7, save_input="shard"),
}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("strategy, backend", STRATEGY_BACKENDS)
def test_recompute_matches_reference_numerics(strategy, backend, options, world):
    if options.get("save_input") == "shard" and backend == "auto":
        options = {k: v for k, v in options.items() if k != "save_input"}  # no all-gather⊗GEMM to stream
    assert all(run_ranks(world, _parity, strategy, backend, options))


def _zero3(rank, world, strategy):
    ref = make_block(torch.float32, **ODD)
    par = odysseus.zero3(odysseus.parallelize(ref, strategy, checkpoint=True, ffn_tile=9))
    g = torch.Generator().manual_seed(6)
    x, gy = torch.randn(2, 61, 96, generator=g), torch.randn(2, 61, 96, generator=g)
    assert_runs_close(run_parallel(par, x, gy), run_reference(ref, x, gy), f"{strategy}+zero3 checkpointed")
    return True


@pytest.mark.parametrize("strategy", ["ulysses", "odysseus"])
def test_checkpoint_with_zero3_numerics(strategy):
    assert all(run_ranks(2, _zero3, strategy))


def _ledger_and_saved(rank, world, strategy, checkpoint):
    par = odysseus.parallelize(make_block(torch.float32, **ODD), strategy, backend="pipelined", checkpoint=checkpoint)
    x = shard_sequence(torch.randn(2, 61, 96, generator=torch.Generator().manual_seed(0))).requires_grad_()
    with CommLedger() as led:
        with SavedActivations(par) as saved:
            y = par(x)
        y.square().sum().backward()
    phases = {
        p: sorted((r.op, r.label, r.bytes_received) for r in led.select(phase=p)) for p in ("forward", "recompute")
    }
    return phases, saved.peak_bytes, x.numel() * x.element_size()


@pytest.mark.parametrize("strategy", ["tp-sp", "ulysses", "odysseus"])
def test_checkpoint_keeps_the_input_and_records_the_recompute(strategy):
    for phases, saved, input_bytes in run_ranks(3, _ledger_and_saved, strategy, True):
        assert phases["recompute"] == phases["forward"] and phases["forward"], phases
        assert saved == input_bytes, (saved, input_bytes)  # the block's input, nothing else
    for phases, saved, input_bytes in run_ranks(3, _ledger_and_saved, strategy, False):
        assert phases["recompute"] == [] and saved > 4 * input_bytes


def _offloaded(rank, world):
    import odysseus.ops.recompute as rc

    packed = []
    real = torch.autograd.graph.save_on_cpu

    class Spy(real):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook

            def spy(t):
                packed.append(tuple(t.shape))
                return pack(t)

            self.pack_hook = spy

    rc.torch.autograd.graph.save_on_cpu = Spy
    try:
        par = odysseus.parallelize(make_block(torch.float32, **ODD), "odysseus", checkpoint=True, offload=True)
        x = shard_sequence(torch.randn(2, 61, 96)).requires_grad_()
        par(x).sum().backward()
    finally:
        rc.torch.autograd.graph.save_on_cpu = real
    return packed, tuple(x.shape)


def test_offload_packs_the_kept_input_through_save_on_cpu():
    for packed, shape in run_ranks(2, _offloaded):
        assert shape in packed, (packed, shape)


def test_bad_options_name_what_they_need():
    with pytest.raises(ValueError, match="offload=True .* needs checkpoint=True"):
        odysseus.parallelize(make_block(), "odysseus", offload=True)
    with pytest.raises(ValueError, match="checkpoint/offload apply to a whole block"):
        odysseus.parallelize(make_block().mlp, "odysseus", checkpoint=True)
    with pytest.raises(ValueError, match="ffn_tile=0 must be a positive number of tokens"):
        odysseus.parallelize(make_block(), "odysseus", ffn_tile=0)


def _ffn_saved(rank, world, strategy, tile):
    par = odysseus.parallelize(make_block(torch.float32, **ODD).mlp, strategy, backend="pipelined", ffn_tile=tile)
    x = shard_sequence(torch.randn(2, 61, 96, generator=torch.Generator().manual_seed(0))).requires_grad_()
    with SavedActivations(par) as saved:
        y = par(x)
    y.sum().backward()
    return saved.peak_bytes, x.numel() * x.element_size()


@pytest.mark.parametrize("strategy", ["tp-sp", "odysseus"])
def test_tiled_ffn_keeps_only_its_input(strategy):
    """Tiled, the FFN keeps its input for backward and recomputes each tile; untiled it keeps the
    (tokens, intermediate) activations, several times the input."""
    for saved, input_bytes in run_ranks(3, _ffn_saved, strategy, 4):
        assert saved == input_bytes, (saved, input_bytes)
    for saved, input_bytes in run_ranks(3, _ffn_saved, strategy, None):
        assert saved > 2 * input_bytes, (saved, input_bytes)
