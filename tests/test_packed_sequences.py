"""Packed sequences: several documents in one row, position_ids restarting at 0 at each document.

The ground truth is each document run alone: a packed row must give, token for token, what its documents
give separately (outputs, the loss over their tokens, every gradient summed over them). Checked for the
reference block, for every strategy at worlds 1-4 (documents crossing shard boundaries, a one-token document,
rows packed differently), for parallelize_llama models against the dense HF model run per document and
against transformers' own packed forward; FlexAttention's document mask against the dense one.
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import ODD, assert_close, local_input, make_block, whole_output
from multirank import run_ranks
from test_hf_models import build, family_config
from transformers import LlamaConfig, LlamaModel

import odysseus
from odysseus import STRATEGIES, dense_state_dict, finalize_grads, shard_sequence
from odysseus.integrations.hf import causal_lm_loss, finalize_model_grads, global_loss, hf_state_dict, parallelize_llama
from odysseus.ops.packing import document_ids, document_mask, flex_documents, packed_attention

# Document lengths of the two rows (61 tokens each). At world 2, 3, 4 the shards start at 31; 21, 41;
# 16, 31, 46: documents cross shard boundaries, and one starts exactly on one (41). Row 1 has a one-token
# document, which may attend only to itself.
DOCS = ([20, 25, 16], [7, 1, 33, 20])
TOL = dict(rtol=1e-5, atol=1e-5, scaled=True)
TIGHT = dict(rtol=1e-10, atol=1e-10, scaled=True)


def packed_positions(docs=DOCS) -> torch.Tensor:
    """``(len(docs), 61)`` positions restarting at 0 at each document (DataCollatorWithFlattening's)."""
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in docs])


def spans(row):
    """[start, end) of each document of a row."""
    out, start = [], 0
    for n in row:
        out.append((start, start + n))
        start += n
    return out


def test_document_ids():
    ids = document_ids(torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 0, 1, 2, 3]]))
    assert ids.tolist() == [[1, 1, 1, 2, 2, 3], [0, 0, 1, 1, 1, 1]]
    # One document per row (a row may start anywhere, and gaps do not split it): nothing is packed.
    assert document_ids(torch.tensor([[0, 1, 2, 3], [4, 9, 10, 30]])) is None
    mask = document_mask(torch.tensor([[1, 1, 2]]), causal=True)[0, 0]
    assert mask.tolist() == [[True, False, False], [True, True, False], [False, False, True]]


# --- the reference block ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_reference_packed_equals_documents_alone_numerics(causal):
    block = make_block(torch.float64, **ODD, qkv_bias=True, causal=causal)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 61, 96, generator=g, dtype=torch.float64)
    gy = torch.randn(2, 61, 96, generator=g, dtype=torch.float64)
    xp = x.clone().requires_grad_()
    y = block(xp, packed_positions())
    y.backward(gy)
    packed_grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    xa = x.clone().requires_grad_()
    parts = []
    for b, row in enumerate(DOCS):
        for s, e in spans(row):
            out = block(xa[b : b + 1, s:e])  # alone, at positions 0..n-1
            out.backward(gy[b : b + 1, s:e])
            parts.append((b, s, e, out.detach()))
    for b, s, e, out in parts:
        assert_close(y[b : b + 1, s:e], out, **TIGHT, what=f"row {b} document [{s}, {e})")
    assert_close(xp.grad, xa.grad, **TIGHT, what="x.grad")
    for name, p in block.named_parameters():
        assert_close(packed_grads[name], p.grad, **TIGHT, what=f"{name}.grad")


# --- every strategy against the reference ---------------------------------------------------------------------


def _strategies(rank, world, causal):
    ref = make_block(torch.float32, **ODD, qkv_bias=True, o_bias=True, mlp_bias=True, causal=causal)
    pos = packed_positions()
    g = torch.Generator().manual_seed(1)
    x, gy = torch.randn(2, 61, 96, generator=g), torch.randn(2, 61, 96, generator=g)
    for what, module in (("block", ref), ("attn", ref.self_attn)):
        xr = x.clone().requires_grad_()
        module.zero_grad()
        y_ref = module(xr, pos)
        y_ref.backward(gy)
        for strategy in STRATEGIES:
            par = odysseus.parallelize(module, strategy)
            xp = x.clone().requires_grad_()
            y = par(local_input(strategy, xp), local_input(strategy, pos))
            (y * local_input(strategy, gy)).sum().backward()
            full = whole_output(strategy, y.detach())
            finalize_grads(par)
            name_ = f"{strategy} {what} at world {world}"
            assert_close(full, y_ref, **TOL, what=f"{name_}: output")
            assert_close(xp.grad, xr.grad, **TOL, what=f"{name_}: x.grad")
            grads = dense_state_dict(par, grad=True)
            for name, p in module.named_parameters():
                assert_close(grads[name], p.grad, **TOL, what=f"{name_}: {name}.grad")
    return True


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_packed_every_strategy_matches_reference_numerics(world):
    assert all(run_ranks(world, _strategies, True))


def test_packed_bidirectional_every_strategy_numerics():
    assert all(run_ranks(3, _strategies, False))


# --- parallelize_llama against the dense HF model, document by document ------------------------------------------


def packed_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 61), generator=g)
    labels = ids.clone()
    for b, row in enumerate(DOCS):  # as DataCollatorWithFlattening: no target across a document boundary
        for s, _ in spans(row):
            labels[b, s] = -100
    labels[0, 30:33] = -100
    return ids, labels


def per_document(ref, ids, labels):
    """(logits, loss) of ``ref`` run on each document alone; its gradients are left in place."""
    logits = torch.empty(*ids.shape, ref.config.vocab_size, dtype=torch.float64)
    total = 0.0
    for b, row in enumerate(DOCS):
        for s, e in spans(row):
            out = ref(ids[b : b + 1, s:e], use_cache=False).logits
            logits[b, s:e] = out[0].detach()
            target = labels[b, s + 1 : e]
            total = total + F.cross_entropy(out[0, :-1].float(), target, ignore_index=-100, reduction="sum")
    loss = total / (labels[:, 1:] != -100).sum()
    loss.backward()
    return logits, loss.detach()


def _hf(rank, world, family):
    config = family_config(family)
    ids, labels = packed_batch()
    pos = packed_positions()
    ref = build(config)
    truth = per_document(ref, ids, labels)
    # transformers' own packing (a dense model given the same position_ids) agrees with the documents alone.
    with torch.no_grad():
        hf_packed = copy.deepcopy(ref)(ids, position_ids=pos, use_cache=False).logits
    assert_close(hf_packed, truth[0], **TOL, what="transformers' packed forward vs per document")
    for strategy in STRATEGIES:
        model = parallelize_llama(copy.deepcopy(ref), strategy)
        split = functools.partial(local_input, strategy)
        logits = model(split(ids), position_ids=split(pos)).logits
        loss = causal_lm_loss(logits, labels)
        loss.backward()
        finalize_model_grads(model)
        full = whole_output(strategy, logits.detach())
        what = f"{family} {strategy} at world {world}"
        assert_close(full, truth[0], **TOL, what=f"{what}: logits")
        assert_close(global_loss(loss, model), truth[1], **TOL, what=f"{what}: loss")
        grads = hf_state_dict(model, grad=True)
        for name, p in ref.named_parameters():
            assert_close(grads[name], p.grad, **TOL, what=f"{what}: {name}.grad")
    return True


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_packed_llama_matches_documents_alone_numerics(world):
    assert all(run_ranks(world, _hf, "llama"))


@pytest.mark.parametrize("family", ["qwen2", "mistral", "longrope-packed"])
def test_packed_families_match_documents_alone_numerics(family):
    # longrope-packed: original_max_position_embeddings=40 < 61 tokens, but no position above 32, so the short
    # factors, as for each document alone (judging by the sequence's length would pick the long ones).
    assert all(run_ranks(3, _hf, family))


# --- how packed calls reach the layers ------------------------------------------------------------------------------


def _calls(rank, world):
    config = LlamaConfig(
        hidden_size=96, num_attention_heads=6, num_key_value_heads=2, intermediate_size=160, num_hidden_layers=2,
        vocab_size=128, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = parallelize_llama(LlamaModel(config), "odysseus")
    ids, _ = packed_batch()
    local_ids, local_pos = shard_sequence(ids), shard_sequence(packed_positions())
    with torch.no_grad():
        by_keyword = model(local_ids, position_ids=local_pos).last_hidden_state
        by_position = model(local_ids, None, local_pos).last_hidden_state  # (input_ids, attention_mask, position_ids)
        unpacked = model(local_ids).last_hidden_state
    assert torch.equal(by_keyword, by_position)
    assert not torch.allclose(by_keyword, unpacked, atol=1e-3)  # the documents really were kept apart
    errors = []
    for bad in ({"cu_seq_lens_q": torch.tensor([0, 20, 61], dtype=torch.int32)}, {"seq_idx": local_pos}):
        try:
            model(local_ids, position_ids=local_pos, **bad)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_position_ids_reach_the_layers_and_varlen_arguments_are_refused():
    errors = run_ranks(2, _calls)[1]
    assert len(errors) == 2
    assert "cu_seq_lens_q was passed" in errors[0] and "find packed documents from position_ids" in errors[0]
    assert "seq_idx was passed" in errors[1]


# --- kernels -----------------------------------------------------------------------------------------------------


def random_documents(B, L, g):
    starts = torch.rand(B, L, generator=g) < 0.15
    starts[:, 0] = True
    return starts.long().cumsum(-1)


@pytest.mark.parametrize("causal", [True, False])
def test_flex_document_mask_matches_dense_mask_numerics(causal):
    """FlexAttention's mask (the CUDA kernel without flash-attn, run here unfused) against SDPA's dense mask.
    Forward only: FlexAttention has no backward on CPU (the GPU test below takes gradients)."""
    g = torch.Generator().manual_seed(2)
    B, L, H, KV, D = 2, 61, 6, 2, 16
    q, k, v = (torch.randn(B, L, h, D, generator=g, dtype=torch.float64) for h in (H, KV, KV))
    docs = random_documents(B, L, g)
    flex = flex_documents(q, k, v, docs, causal, compiled=False)
    dense = packed_attention(q, k, v, docs, causal)
    assert_close(flex, dense, **TIGHT, what="flex vs dense mask")
    plain = packed_attention(q, k, v, torch.zeros_like(docs), causal)  # one document: differs
    assert (plain - dense).abs().max() > 0.1


@pytest.mark.gpu
def test_cuda_packed_kernel_matches_dense_mask_numerics():
    """flash-attn varlen (if installed) or compiled FlexAttention on CUDA, bf16, against the dense mask in
    fp32 on the CPU: output and the gradients of q, k and v."""
    g = torch.Generator().manual_seed(3)
    B, L, H, KV, D = 2, 509, 8, 2, 64
    q, k, v = (torch.randn(B, L, h, D, generator=g) for h in (H, KV, KV))
    gy = torch.randn(B, L, H, D, generator=g)
    docs = random_documents(B, L, g)
    results = []
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        out = packed_attention(*leaves, docs.to(device), True)
        out.backward(gy.to(device, dtype))
        results.append([t.detach().float().cpu() for t in (out, *(x.grad for x in leaves))])
    for name, want, got in zip(("out", "q.grad", "k.grad", "v.grad"), *results):
        assert_close(got, want, 2e-2, 2e-2, f"CUDA packed attention {name}", scaled=True)
