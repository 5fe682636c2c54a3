"""What a real training loop does around the numbers: clip the gradient norm, freeze weights, keep an EMA
copy, save with Hugging Face's method, try generate(). Each against the unsplit model doing the same."""

import copy
import math

import pytest
import torch
from helpers import assert_close, local_input, make_block, whole_output
from multirank import run_ranks
from test_hf_numerics import batch, tiny_llama

import odysseus
from odysseus import STRATEGIES, dense_state_dict, finalize_grads, shard_sequence
from odysseus.integrations.hf import causal_lm_loss, finalize_model_grads, hf_state_dict, parallelize_llama

MAX_NORM = 0.05  # below every test's gradient norm, so clipping really scales
F64 = dict(rtol=1e-10, atol=1e-10, scaled=True)
F32 = dict(rtol=1e-5, atol=1e-5, scaled=True)


def _block_step(ref, par, strategy, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 61, 96, generator=g, dtype=ref.input_layernorm.weight.dtype)
    gy = torch.randn(x.shape, generator=g, dtype=x.dtype)
    split = par.sequence_split
    y = par(shard_sequence(x) if split else x)
    (y * (shard_sequence(gy) if split else gy)).sum().backward()
    finalize_grads(par)
    ref(x).backward(gy)


# --- clip_grad_norm_ --------------------------------------------------------------------------------------


def _clip_blocks(rank, world):
    """Every strategy, fp64: the norm equals torch's on the dense block, and so do the clipped gradients."""
    norms = []
    for strategy in STRATEGIES:
        ref = make_block(torch.float64)
        par = odysseus.parallelize(ref, strategy)
        _block_step(ref, par, strategy)
        expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
        got = odysseus.clip_grad_norm_(par, MAX_NORM)
        assert expected > 4 * MAX_NORM, f"{strategy}: the norm {expected} would not be clipped"
        assert_close(got, expected, **F64, what=f"{strategy} world {world} total norm")
        grads = dense_state_dict(par, grad=True)
        for name, p in ref.named_parameters():
            assert_close(grads[name], p.grad, **F64, what=f"{strategy} {name}.grad after clipping")
        # Bare parameters (what Trainer passes) and the max-norm: found through the modules that hold them.
        inf = odysseus.grad_norm(iter(list(par.parameters())), math.inf)
        assert_close(inf, max(p.grad.abs().max() for p in ref.parameters()), **F64, what=f"{strategy} inf-norm")
        norms.append((got.item(), inf.item()))
    return norms


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_clip_grad_norm_is_the_dense_norm_numerics(world):
    norms = run_ranks(world, _clip_blocks)
    assert all(n == norms[0] for n in norms), f"ranks disagree on the norm: {norms}"


def _clip_llama(rank, world, strategy, zero3):
    """A parallelize_llama model (ZeRO-3: DTensor gradients beside plain ones), 3 SGD steps with clipping,
    against the dense model trained with torch's clipping: weights agree and stay equal on every rank. SGD,
    not Adam, whose update hardly depends on the gradient's scale, so a wrong clipping factor would show."""
    ref = tiny_llama()
    model = parallelize_llama(copy.deepcopy(ref), strategy)
    if zero3:
        odysseus.zero3(model)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5, weight_decay=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.1)
    ids, labels = batch()
    norms = []
    for step in range(3):
        opt_ref.zero_grad()
        ref(ids, labels=labels).loss.backward()
        expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.zero_grad()
        causal_lm_loss(model(local_input(strategy, ids)).logits, labels).backward()
        finalize_model_grads(model)
        got = odysseus.clip_grad_norm_(model, 1.0)
        assert expected > 1.0, f"the norm {expected} would not be clipped"
        assert_close(got, expected, **F32, what=f"{strategy} zero3={zero3} step {step} norm")
        norms.append(got.item())
        opt_ref.step()
        opt.step()
    weights = hf_state_dict(model)
    for name, p in ref.named_parameters():
        assert_close(weights[name], p, **F32, what=f"{strategy} zero3={zero3} {name} after 3 clipped steps")
    replicated = {n: p.detach().clone() for n, p in model.named_parameters() if "layers." not in n}
    return norms, replicated


@pytest.mark.parametrize("strategy, zero3", [("tp", False), ("tp-sp", True), ("ulysses", True), ("odysseus", True)])
def test_clipped_llama_training_matches_dense_numerics(strategy, zero3):
    out = run_ranks(3, _clip_llama, strategy, zero3)
    for rank, (norms, replicated) in enumerate(out):
        assert norms == out[0][0], f"rank {rank} norms {norms} != rank 0 {out[0][0]}"
        for name, t in replicated.items():  # no drift between the ranks' copies of replicated weights
            assert torch.equal(t, out[0][1][name]), f"rank {rank}: replicated {name} differs from rank 0's"


# --- autocast ---------------------------------------------------------------------------------------------

# Measured worst errors (relative to the largest value) of output, input gradient and every weight gradient
# against the dense block under the same autocast, worlds 2-3: bf16 1.1e-2 (bf16's unit roundoff is 3.9e-3;
# the two reduce in different orders), fp16 1.2e-3. Without autocast they agree to 1e-6.
AUTOCAST_TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _autocast_blocks(rank, world, cases):
    from helpers import rel_err

    out = {}
    for strategy, backend, dtype in cases:
        ref = make_block()
        par = odysseus.parallelize(ref, strategy, backend=backend)
        g = torch.Generator().manual_seed(0)
        x, gy = torch.randn(2, 61, 96, generator=g), torch.randn(2, 61, 96, generator=g)
        split = par.sequence_split
        xi = (shard_sequence(x) if split else x).detach().requires_grad_()
        with torch.autocast("cpu", dtype=dtype), odysseus.CommLedger() as ledger:
            y = par(xi)
        (y * (shard_sequence(gy) if split else gy)).sum().backward()
        finalize_grads(par)
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            yr = ref(xr)
        yr.backward(gy)
        full = odysseus.gather_sequence(y.detach()) if split else y.detach()
        gx = odysseus.gather_sequence(xi.grad) if split else xi.grad
        errs = {"output": rel_err(full, yr), "x.grad": rel_err(gx, xr.grad)}
        grads = dense_state_dict(par, grad=True)
        errs.update({f"{n}.grad": rel_err(grads[n], p.grad) for n, p in ref.named_parameters()})
        worst = max(errs, key=errs.get)
        assert errs[worst] < AUTOCAST_TOL[dtype], f"{strategy}/{backend}/{dtype}: {worst} off by {errs[worst]:.2e}"
        # The overlap ops computed in the autocast dtype: their all-gathers moved 2-byte elements.
        gathers = [r for r in ledger.records if r.op == "all_gather" and r.category == "activation"]
        sent = sum(r.bytes_sent for r in gathers)
        if world > 1 and strategy in ("tp-sp", "odysseus"):
            elements = 2 * xi.shape[1] * 96 * (world - 1) * (1 if strategy == "odysseus" else 2)
            assert sent == 2 * elements, f"{strategy}/{backend}: gathered {sent} bytes, expected {2 * elements}"
        out[(strategy, backend, str(dtype))] = errs[worst]
    return out


CASES = [(s, b, torch.bfloat16) for s in STRATEGIES for b in ("naive", "pipelined")]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_autocast_bf16_matches_dense_autocast_numerics(world):
    assert run_ranks(world, _autocast_blocks, CASES, timeout=300)


def test_autocast_fp16_symm_matches_dense_autocast_numerics():
    # symm on CPU runs its Triton kernels in the interpreter, which has no bf16: fp16 autocast instead.
    # One strategy, whose attention holds both ops, to keep the interpreter's time down.
    assert run_ranks(3, _autocast_blocks, [("odysseus", "symm", torch.float16)], timeout=300)


def _autocast_llama(rank, world, strategy):
    ref = tiny_llama()
    model = parallelize_llama(copy.deepcopy(ref), strategy)
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref = ref(ids, labels=labels)
        logits = model(local_input(strategy, ids)).logits
        loss = causal_lm_loss(logits, labels)
    out_ref.loss.backward()
    loss.backward()
    finalize_model_grads(model)
    full = whole_output(strategy, logits.detach())
    tol = dict(rtol=0.0, atol=AUTOCAST_TOL[torch.bfloat16], scaled=True)
    assert_close(full, out_ref.logits, **tol, what=f"{strategy} bf16 logits")
    grads = hf_state_dict(model, grad=True)
    for name, p in ref.named_parameters():
        assert_close(grads[name], p.grad, **tol, what=f"{strategy} bf16 {name}.grad")
    return True


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_autocast_llama_matches_transformers_autocast_numerics(strategy):
    assert all(run_ranks(3, _autocast_llama, strategy))


# --- frozen parameters, EMA copies, HF's save_pretrained, generate() ---------------------------------------

FROZEN = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight")
FROZEN += ("model.layers.0.input_layernorm.weight",)


def _frozen(rank, world, strategy):
    ref = tiny_llama()
    model = parallelize_llama(copy.deepcopy(ref), strategy)
    for m in (ref, model):
        for name in FROZEN:
            m.get_parameter(name).requires_grad_(False)
    before = hf_state_dict(model)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    ids, labels = batch()
    for step in range(2):
        for o in (opt_ref, opt):
            o.zero_grad()
        ref(ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        causal_lm_loss(model(local_input(strategy, ids)).logits, labels).backward()
        finalize_model_grads(model)
        assert all(model.get_parameter(n).grad is None for n in FROZEN), "a frozen weight was given a gradient"
        odysseus.clip_grad_norm_(model, 1.0)
        grads = hf_state_dict(model, grad=True)
        assert not set(FROZEN) & set(grads), "hf_state_dict(grad=True) lists frozen weights"
        for name, p in ref.named_parameters():
            if p.requires_grad and step == 0:  # (after an Adam step, rounding differences are amplified)
                assert_close(grads[name], p.grad, **F32, what=f"{strategy} {name}.grad beside frozen weights")
        opt_ref.step()
        opt.step()
    after = hf_state_dict(model)
    for name in FROZEN:
        assert torch.equal(after[name], before[name]), f"{strategy}: frozen {name} moved"
    # Adam divides by sqrt(v): where a gradient is ~1e-8, rounding-level differences move a weight by a share
    # of the learning rate (measured 1.8e-5 at lr 1e-2 with transformers 4.x, 2.1e-4 on one element of 15360
    # with transformers 5.25, whose reference model rounds differently); a wrong update is of the order of lr
    # itself, 20 times the bound.
    for name, p in ref.named_parameters():
        assert_close(after[name], p, rtol=0.0, atol=0.05 * 1e-2, what=f"{strategy} {name} after 2 steps")
    return True


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_frozen_weights_stay_put_numerics(strategy):
    assert all(run_ranks(3, _frozen, strategy))


def _ema(rank, world, strategy):
    """An EMA copy by deepcopy: it shares the group, runs, and averages toward the trained weights."""
    ref = make_block()
    par = odysseus.parallelize(ref, strategy)
    ema = copy.deepcopy(par)
    assert ema.pg is par.pg and ema.self_attn.region.pg is par.pg
    assert all(a is not b for a, b in zip(ema.parameters(), par.parameters()))
    opt = torch.optim.SGD(par.parameters(), lr=0.1)
    _block_step(copy.deepcopy(ref), par, strategy)
    opt.step()
    with torch.no_grad():
        for e, p in zip(ema.parameters(), par.parameters()):
            e.lerp_(p, 0.5)
    trained = dense_state_dict(par)
    expected = {k: (v + trained[k]) / 2 for k, v in ref.state_dict().items()}
    for k, v in dense_state_dict(ema).items():
        assert_close(v, expected[k], **F32, what=f"{strategy} EMA {k}")
    x = torch.randn(1, 61, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = ema(shard_sequence(x) if ema.sequence_split else x)
        dense = copy.deepcopy(ref)
        dense.load_state_dict(dense_state_dict(ema))
        want = dense(x)
    assert_close(odysseus.gather_sequence(y) if ema.sequence_split else y, want, **F32, what=f"{strategy} EMA out")
    return True


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deepcopy_shares_the_group_numerics(strategy, world):
    assert all(run_ranks(world, _ema, strategy))


def _hf_save(rank, world, path):
    model = parallelize_llama(tiny_llama(), "odysseus")
    with pytest.raises(ValueError, match=r"would write this rank's weight shards.*hf.save_pretrained\(model"):
        model.save_pretrained(path)
    model.save_pretrained(path, state_dict=hf_state_dict(model))  # the documented way with HF's method
    copy.deepcopy(model).save_pretrained(path, state_dict=hf_state_dict(model))
    with pytest.raises(ValueError, match="generate\\(\\) is not supported.*keep no KV cache"):
        model.generate(batch()[0][:, :5], use_cache=False, max_new_tokens=2)
    return True


@pytest.mark.parametrize("world", [1, 3])
def test_hf_save_pretrained_writes_dense_tensors_and_generate_says_why(world, tmp_path):
    from transformers import LlamaForCausalLM

    assert all(run_ranks(world, _hf_save, str(tmp_path)))
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    for name, t in tiny_llama().state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), f"{name} was not written dense"


# --- examples/train_llama.py: --clip, --autocast and the progress bar --------------------------------------


def _train_example(rank, world, flags):
    import io
    import re
    import sys

    from test_train_example import _example

    example = _example()
    err, sys.stderr = sys.stderr, io.StringIO()
    try:
        losses = example.train(example.parse_args(flags))
        shown = sys.stderr.getvalue()
    finally:
        sys.stderr = err
    # Every frame of the bar that shows a loss must show the step that loss belongs to.
    frames = re.findall(r"(\d+)/\d+ \[[^\]]*\]?[^\r\n]*?loss (\d+\.\d+)  grad norm (\d+\.\d+)", shown)
    return losses, [(int(n), float(loss), float(norm)) for n, loss, norm in frames]


def test_train_example_bar_shows_each_step_with_its_loss():
    from test_train_example import SIZES

    flags = [*SIZES, "--steps", "4", "--save-every", "0", "--log-every", "1"]
    flags += ["--strategy", "tp-sp", "--zero3", "--clip", "0.5", "--autocast"]
    (losses, frames), _ = run_ranks(2, _train_example, flags, timeout=300)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), losses
    assert sorted({n for n, _, _ in frames}) == [1, 2, 3, 4], frames
    for n, loss, norm in frames:
        assert loss == round(losses[n - 1], 4), f"the bar shows step {n} beside loss {loss}; losses {losses}"
        assert norm > 0.5, f"step {n}: grad norm {norm} would not be clipped at 0.5"


def _example_losses(rank, world, flags):
    from test_train_example import _example

    example = _example()
    return example.train(example.parse_args(flags))


@pytest.mark.parametrize("strategy", ["tp-sp", "ulysses", "odysseus"])
def test_train_example_long_sequence_flags_give_the_plain_losses_numerics(strategy):
    """--checkpoint --offload --ffn-tile --loss-chunk --save-input shard change what is kept, not the numbers:
    three fp32 steps at world 3 on 61 tokens give the plain run's losses."""
    from test_train_example import SIZES

    flags = [*SIZES, "--seq", "61", "--steps", "3", "--save-every", "0", "--log-every", "3", "--strategy", strategy]
    long = ["--checkpoint", "--offload", "--ffn-tile", "7", "--loss-chunk", "13", "--save-input", "shard"]
    if strategy == "ulysses":
        long = long[:-2]  # ulysses has no all-gather GEMM whose input it could keep sharded
    plain = run_ranks(3, _example_losses, flags, timeout=300)
    tuned = run_ranks(3, _example_losses, flags + long, timeout=300)
    for a, b in zip(plain, tuned):
        assert len(a) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
