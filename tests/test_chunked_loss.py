"""The LM head and loss a chunk of tokens at a time: the same loss and gradients as full logits.

linear_cross_entropy against an fp64 computation on full logits (chunks of 1 token to more than all, ignored
tokens, bias, frozen weight, autocast); Liger-Kernel's fused kernel on CPU through Triton's interpreter; and
model_loss on a parallelize_llama model at worlds 1-4 against the unsplit transformers model, every gradient.
"""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, local_input
from multirank import run_ranks
from test_hf_numerics import TOL, batch, tiny_llama

from odysseus import STRATEGIES, shard_sequence
from odysseus.integrations.hf import (
    causal_lm_loss,
    finalize_model_grads,
    global_loss,
    hf_state_dict,
    lm_head_loss,
    model_loss,
    parallelize_llama,
)
from odysseus.ops.chunked_loss import linear_cross_entropy


def _problem(dtype=torch.float32, T=(3, 23), H=24, V=37, bias=True):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(*T, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    t = torch.randint(0, V, T, generator=g)
    t[0, :4] = -100
    t[2, 22] = -100
    return h, w, b, t


def _grads(fn, *tensors):
    leaves = [None if x is None else x.detach().clone().requires_grad_(x.dtype.is_floating_point) for x in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [None if x is None or x.grad is None else x.grad for x in leaves]


def _full(h, w, b, t):
    return F.cross_entropy(F.linear(h, w, b).flatten(0, 1), t.flatten(), reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 69, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_cross_entropy_matches_fp64_full_logits_numerics(chunk, bias):
    h, w, b, t = _problem(bias=bias)
    want, want_grads = _grads(_full, h.double(), w.double(), None if b is None else b.double(), t)
    got, got_grads = _grads(lambda *a: linear_cross_entropy(*a[:3], bias=a[3], chunk=chunk), h, w, t, b)
    assert got.dtype == torch.float32
    assert_close(got, want, rtol=1e-6, atol=1e-6, what=f"loss chunk={chunk}")
    for name, g, ref in zip(("hidden", "weight", "bias"), got_grads[:2] + got_grads[3:], want_grads):
        if ref is None:
            assert g is None
            continue
        assert_close(g, ref, rtol=1e-5, atol=1e-6, scaled=True, what=f"{name}.grad chunk={chunk}")


def test_frozen_weight_and_a_scaled_upstream_gradient_numerics():
    h, w, _, t = _problem(bias=False)
    hd = h.double().requires_grad_()
    (3.5 * _full(hd, w.double(), None, t)).backward()
    hc = h.clone().requires_grad_()
    wf = w.clone()  # frozen: no gradient requested, none computed
    (3.5 * linear_cross_entropy(hc, wf, t, chunk=5)).backward()
    assert wf.grad is None
    assert_close(hc.grad, hd.grad, rtol=1e-5, atol=1e-6, scaled=True, what="hidden.grad, frozen head")


def test_autocast_runs_the_head_in_the_autocast_dtype_numerics():
    """Under autocast the chunked head rounds where Hugging Face's does (bf16 matmul, fp32 loss): it matches
    that computation to bf16 rounding, and is far from fp32 (so the autocast dtype was used)."""
    h, w, b, t = _problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = _grads(lambda h_, w_, b_: F.cross_entropy(F.linear(h_, w_, b_).float().flatten(0, 1),
                                                                    t.flatten(), reduction="sum"), h, w, b)  # fmt: skip
        got, got_grads = _grads(lambda h_, w_, b_: linear_cross_entropy(h_, w_, t, b_, chunk=11), h, w, b)
    exact = _full(h.double(), w.double(), b.double(), t)
    assert_close(got, want, rtol=2e-3, atol=0, what="autocast loss")
    assert (got.double() - exact).abs() > 1e-5 * exact.abs(), "the loss looks fp32: autocast was ignored"
    for name, g, ref in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        assert g.dtype == ref.dtype == torch.float32
        assert_close(g, ref, rtol=2e-2, atol=2e-3, scaled=True, what=f"autocast {name}.grad")


def test_bad_inputs_are_refused():
    h, w, b, t = _problem()
    with pytest.raises(ValueError, match=r"targets of shape \(3, 22\)"):
        linear_cross_entropy(h, w, t[:, 1:])
    with pytest.raises(ValueError, match=r"weight of shape \(37, 23\); expected \(vocab, 24\)"):
        linear_cross_entropy(h, w[:, 1:], t)
    with pytest.raises(ValueError, match=r"bias of shape \(36,\)"):
        linear_cross_entropy(h, w, t, b[1:])
    with pytest.raises(ValueError, match="targets of dtype torch.float32"):
        linear_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match="chunk=0"):
        linear_cross_entropy(h, w, t, chunk=0)
    with pytest.raises(ValueError, match="impl='fused'"):
        linear_cross_entropy(h, w, t, impl="fused")


_LIGER = """
import torch, torch.nn.functional as F
from odysseus.ops.chunked_loss import linear_cross_entropy
g = torch.Generator().manual_seed(4)
h, w, b = torch.randn(2, 9, 16, generator=g), torch.randn(40, 16, generator=g) / 4, torch.randn(40, generator=g)
t = torch.randint(0, 40, (2, 9), generator=g)
t[1, 3] = -100
leaves = [x.clone().requires_grad_() for x in (h, w, b)]
loss = linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], impl="liger")
loss.backward()
ref = [x.double().requires_grad_() for x in (h, w, b)]
want = F.cross_entropy(F.linear(*ref).flatten(0, 1), t.flatten(), reduction="sum")
want.backward()
err = max([abs(loss.item() - want.item()) / abs(want.item())]
          + [((a.grad - r.grad).abs().max() / r.grad.abs().max()).item() for a, r in zip(leaves, ref)])
print("MAXREL", err)
"""


def test_liger_fused_kernel_matches_fp64_under_the_interpreter_numerics():
    """impl="liger" runs Liger-Kernel's Triton kernels; on CPU they run through Triton's interpreter, which
    must be switched on before triton is imported, hence a fresh process."""
    # liger-kernel is a test dependency (setup.cfg): without it impl="liger" raises and this test fails.
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_LIGER)], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    err = float(out.stdout.split("MAXREL")[1])
    assert err < 1e-5, f"Liger's fused linear cross-entropy is {err:.2e} away from fp64"


def _model_loss(rank, world, strategy, chunk, tie):
    ref = tiny_llama(tie)
    model = parallelize_llama(copy.deepcopy(ref), strategy, checkpoint=True)
    ids, labels = batch()
    out = ref(ids, labels=labels)
    out.loss.backward()
    x = local_input(strategy, ids)
    loss = model_loss(model, x, labels, chunk=chunk, impl="chunked")
    loss.backward()
    finalize_model_grads(model)
    assert_close(global_loss(loss, model), out.loss, **TOL, what=f"{strategy} chunked loss")
    grads = hf_state_dict(model, grad=True)
    for name, p in ref.named_parameters():
        assert_close(grads[name], p.grad, **TOL, what=f"{strategy} chunk={chunk} {name}.grad")
    return True


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_model_loss_matches_the_unsplit_model_numerics(strategy, world):
    assert all(run_ranks(world, _model_loss, strategy, 5, False))


def test_model_loss_with_tied_embeddings_numerics():
    assert all(run_ranks(3, _model_loss, "odysseus", 7, True))


def _head_loss_equals_logits_loss(rank, world):
    model = parallelize_llama(tiny_llama(), "ulysses")
    ids, labels = batch()
    hidden = model.model(shard_sequence(ids)).last_hidden_state
    a = lm_head_loss(hidden, model.lm_head, labels, chunk=3, impl="chunked")
    b = causal_lm_loss(model.lm_head(hidden), labels)
    assert_close(a, b, rtol=1e-6, atol=1e-7, what="lm_head_loss vs causal_lm_loss")
    with pytest.raises(ValueError, match=r"expects its shard of \d+ tokens"):
        lm_head_loss(hidden[:, 1:], model.lm_head, labels)
    return True


def test_lm_head_loss_equals_causal_lm_loss_on_each_rank_numerics():
    assert all(run_ranks(3, _head_loss_equals_logits_loss))
