"""Activation memory of one block on one rank: what forward keeps for backward, and the peak of forward +
backward + ``finalize_grads`` (16-bit activations).

``saved_activation_bytes`` is exact (``SavedActivations`` in ``perf/memory.py``). ``block_peak`` is the most
bytes alive at once beyond what existed before the block ran (its weights, its input, the gradient of its
output), as :class:`odysseus.training.memtrack.MemoryTracker` measures it; ``perf/memory.py`` checks it on every
strategy, ``save_input`` mode, CPU backend and ZeRO-3 variant. The peak is the largest of a few moments,
each what is resident then (saved tensors not yet released, gradients made so far) plus that moment's
transients, derived from the modules:

- **SwiGLU backward** (``odysseus.ops.swiglu``): the fp32 sigmoid, the gate's gradient built in fp32 and both
  16-bit gradients, 12 bytes per FFN element.
- **RMSNorm backward** (``odysseus.ops.rmsnorm``): the 16-bit input gradient, the fp32 weight gradient and, for
  one chunk of tokens at a time, three fp32 tensors (the recomputed normalised input, the gradient, their
  product). The input norm keeps the block's input itself, which is not new memory.
- **output GEMM backward/forward** (TP-SP, Odysseus): the output gradient gathered beside the input
  gradient; TP-SP's FFN forward partial sums before the reduce-scatter (naive, pipelined without a ring).
- **input GEMM backward**, ``save_input="shard"``: the re-gather's receive slots and the weight gradient
  accumulated in fp32 (a 16-bit and an fp32 copy of each piece's product, and the fp32 sum).
- **FFN forward under ZeRO-3**: FSDP2's all-gather buffer and the unsharded FFN weights with the FFN's
  activations.
- **finalize_grads**: the zero-padded dense gradients of shared kv heads, the flat all-reduce buffer and
  the new gradients, while the old ones are still referenced.
- **ring attention forward/backward** (``ring > 1``): the K/V blocks in flight, the fp32 accumulators, K and V
  expanded in fp32, the diagonal block's causal mask and one tile of scores (``odysseus.plan.ring.ring_transients``,
  measured by ``perf/memory.py``); ``finalize_grads`` then sums the gradients over the ring in a second flat
  buffer.

The backend enters through its gathers: ``naive`` gathers a whole input at once, ``pipelined`` streams it
through the ring's slots; ``symm`` stages a rank's chunk in a persistent symmetric workspace and receives
reduce-scatter partials in slots for every source (``odysseus.plan.overlap_memory``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..layout import HeadSplit, norm_chunk_tokens, shard_sizes
from ..strategies.registry import GATHER_SCATTER
from .case import Case
from .data_parallel import dp_grad_numel
from .forms import _fsdp_local, _fsdp_units_by_part, dense_numel, ffn_split, heads_split
from .overlap_memory import FP32, input_gemm_backward, output_gemm_backward, output_gemm_forward
from .ring import ring_transients, ring_weight_numel, zero3_view


def _attention_core_bytes(case: Case, tokens: int, qkv_width: int | None) -> int:
    """What local attention keeps: q, k, v as SDPA/flash sees them, the output and the fp32 log-sum-exp.

    ``qkv_width``: v is a view of the fused QKV output of that many columns (heads split), so its whole
    storage stays alive; None: v is its own tensor. Non-uniform GQA expands k and v to one per query head
    (``index_select``, which keeps its index).
    """
    B, hd, e, s = case.batch, case.config.head_dim, case.dtype_bytes, case.shape
    core = B * tokens * s.q_heads * hd * e * 2 + B * s.q_heads * tokens * FP32  # rotated q, output, lse
    if not s.uniform:
        return core + 2 * B * tokens * s.q_heads * hd * e + 8 * s.q_heads
    k = B * tokens * s.kv_heads * hd * e
    return core + k + (B * tokens * qkv_width * e if qkv_width is not None else k)


def input_rows(case: Case, kind: str) -> int:
    """Rows (batch x tokens) of the input a column-split GEMM keeps for its weight gradient, for a part whose
    activations move as ``kind``: an all-gather⊗GEMM keeps the gathered sequence, or only this rank's shard
    with ``save_input="shard"``; TP's GEMM keeps the whole sequence it holds."""
    shard = kind == GATHER_SCATTER and case.save_input == "shard"
    return case.batch * (case.shape.tokens if shard else case.seq)


def norm_rows(case: Case) -> int:
    """Rows (batch x tokens) each RMSNorm sees: this rank's shard where the sequence is split, else all."""
    return case.batch * (case.shape.tokens if case.spec.sequence_split else case.seq)


def ffn_rows_cols(case: Case) -> tuple[int, int]:
    """(rows, columns) of this rank's FFN activations at once: every token of its columns, or its tokens of
    all; with ``case.ffn_tile`` those of the largest tile (:func:`ffn_tile_tokens`)."""
    if ffn_split(case):
        return case.batch * ffn_tile_tokens(case, case.seq), case.shape.ffn_cols
    return case.batch * ffn_tile_tokens(case, case.shape.tokens), case.config.intermediate_size


def ffn_tile_tokens(case: Case, tokens: int) -> int:
    """Tokens of the largest FFN tile out of ``tokens`` (the FFN's GEMM rows without tiling), as
    ``odysseus.strategies.ffn`` cuts them: a sequence-parallel FFN takes ``ffn_tile`` of its tokens at a time;
    a column-split one cuts every rank's shard into the same number of pieces (``Span.tiles``), and a tile
    gathers the first piece of each (TP: of its own sequence)."""
    if case.ffn_tile is None:
        return tokens
    if not ffn_split(case):
        return min(case.ffn_tile, tokens)
    sizes = shard_sizes(case.seq, case.world) if case.spec.sequence_split else [case.seq]
    count = max(1, min(-(-max(sizes) // case.ffn_tile), min(sizes)))
    return sum(shard_sizes(n, count)[0] for n in sizes)


def saved_parts(case: Case) -> dict[str, int]:
    """Bytes one block's forward keeps for backward, by part: ``norm`` (each of the two), ``attention``, ``ffn``.

    Derived from the modules: RMSNorm keeps its fp32 input, the rsqrt and the normalised input; each GEMM
    keeps its input (the gathered full sequence where weights are split, or only this rank's shard with
    ``save_input="shard"``) and the concatenated weight copy (``torch.cat`` of q/k/v or gate/up, split
    weights); RoPE keeps cos/sin; attention keeps q, k, v, the output and the log-sum-exp; the fused SwiGLU
    (``odysseus.ops.swiglu``) keeps gate and up, and the down projection their product.
    """
    c, B, e, L, s = case.config, case.batch, case.dtype_bytes, case.seq, case.shape
    d, hd = c.hidden_size, c.head_dim
    norm = norm_rows(case) * (e * d + FP32)
    if heads_split(case):  # projections of this rank's heads on the full sequence, attention on them
        width = (s.q_heads + 2 * s.kv_heads) * hd
        attn = input_rows(case, case.spec.attention_comm) * d * e + d * width * e + 2 * L * hd * e
        # On a ring, v reaches the ring op as a contiguous copy: the fused QKV output is not what it keeps.
        attn += _attention_core_bytes(case, L, width if case.ring == 1 else None)
    else:  # projections on the shard, attention on all tokens of this rank's heads
        attn = B * s.tokens * d * e + 2 * s.tokens * hd * e + B * s.tokens * c.num_heads * hd * e
        attn += _attention_core_bytes(case, L, None)
    ffn = norm_rows(case) * d * e if case.ffn_tile else ffn_tile_saved(case)  # tiled: only its input (views)
    return {"norm": norm, "attention": attn, "ffn": ffn}


def ffn_tile_saved(case: Case) -> int:
    """What the FFN keeps for backward untiled, or one tile of it while that tile is recomputed (``ffn_tile``):
    the gathered input (or shard), gate|up (one tensor), their product and the gate|up weight copy where the
    FFN is split by columns; its input, gate, up and product where it is whole."""
    d, e = case.config.hidden_size, case.dtype_bytes
    rows, cols = ffn_rows_cols(case)
    if ffn_split(case):
        kept = input_rows(case, case.spec.ffn_comm) * rows // (case.batch * case.seq)  # the tile's share
        return kept * d * e + 3 * rows * cols * e + d * 2 * cols * e
    return rows * (d + 3 * cols) * e


def kept_input_bytes(case: Case) -> int:
    """The block's input, which its first norm keeps for backward (part of :func:`saved_activation_bytes`):
    in a model it is the block below's output, so it exists before the block runs."""
    return norm_rows(case) * case.config.hidden_size * case.dtype_bytes


def saved_activation_bytes(case: Case) -> int:
    """Bytes one block's forward keeps for backward on ``case.rank`` (what ``SavedActivations`` measures):
    :func:`saved_parts` summed. A ZeRO-3 variant keeps what its strategy keeps (FSDP2 frees the gathered
    weights after forward)."""
    parts = saved_parts(case)
    return 2 * parts["norm"] + parts["attention"] + parts["ffn"]


# --- transients ----------------------------------------------------------------------------------------


def swiglu_backward_bytes(case: Case) -> int:
    """Most bytes the fused SwiGLU's backward (``odysseus.ops.swiglu``) adds at once: the fp32 sigmoid and the
    gate's fp32 gradient being built, with both gradients in the activations' dtype: 12 bytes per element
    in bf16 (4 + 4 + 2 + 2), and in fp32 (the sigmoid and the two gradients)."""
    rows, cols = ffn_rows_cols(case)
    return 12 * rows * cols


def norm_backward_bytes(case: Case) -> int:
    """Most bytes the fused RMSNorm's backward (``odysseus.ops.rmsnorm``) adds at once: the input gradient and
    the fp32 weight gradient, allocated first, and one chunk's (``layout.RMSNORM_CHUNK_ROWS`` rows) recomputed fp32
    normalised input, fp32 gradient being built, fp32 product whose per-token mean it needs, and that mean."""
    rows, d = norm_rows(case), case.config.hidden_size
    chunk = case.batch * norm_chunk_tokens((case.batch, rows // case.batch, d))
    return rows * d * case.dtype_bytes + FP32 * d + 3 * FP32 * chunk * d + FP32 * chunk


# --- the peak ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peak:
    """The peak of one block's forward + backward + ``finalize_grads`` on one rank (bytes beyond its start)."""

    bytes: int
    moment: str
    """Where it falls (a key of ``moments``)."""
    moments: dict[str, int]
    """Every candidate moment and its bytes."""
    gradients: dict[str, int]
    """The block's own weight gradients included in each moment (a model counts them with its gradients)."""


def _grads(case: Case) -> dict[str, int]:
    e = case.dtype_bytes
    return {part: g * e for part, (_, g) in ring_weight_numel(case).items()}


def _fsdp_ffn(case: Case) -> tuple[int, int]:
    """(unsharded FFN weights, FSDP2's padded all-gather buffer of them) in bytes, under ZeRO-3 with whole FFN
    weights; else zeros. On one rank FSDP2 gathers nothing: its unsharded copy outlives the step."""
    if not (case.variant.zero3 and not ffn_split(case)) or zero3_view(case).world == 1:
        return 0, 0
    unit, e, n = _fsdp_units_by_part(case)[0], case.dtype_bytes, zero3_view(case).world
    whole = sum(dim0 * rest for dim0, rest in unit)
    padded = sum(_fsdp_local(dim0, rest, n, case.rank)[0] for dim0, rest in unit) * n
    return whole * e, padded * e


def sync_bytes(case: Case) -> int:
    """``finalize_grads``: the zero-padded dense gradients of split weights several ranks hold (shared kv
    heads) and the flat all-reduce buffer of everything it sums (the sums are copied back into the
    gradients in place). On a ring, every gradient FSDP2 does not reduce is then summed over the ring through a
    second flat buffer, while the first is still referenced (``training.state._sum_over_replicas``)."""
    ring = dp_grad_numel(case, "hybrid" if case.variant.zero3 else None) if case.ring > 1 else 0
    if case.world == 1:
        return ring * case.dtype_bytes
    c, dense = case.config, dense_numel(case.config)
    padded = flat = 0
    if heads_split(case) and HeadSplit.build(c, case.world, case.rank).shared_kv:
        padded = flat = dense["k_proj"] + dense["v_proj"]
    if not case.variant.zero3:
        flat += sum(dense[n] for n in case.spec.replicated) + (2 * c.hidden_size if case.spec.sequence_split else 0)
    return (padded + flat + ring) * case.dtype_bytes


def block_peak(case: Case, backend: str = "pipelined") -> Peak:
    """The most bytes alive at once during one block's forward + backward + ``finalize_grads`` on
    ``case.rank``, beyond the weights, the input and the output's gradient (see the module docstring)."""
    if backend not in ("naive", "pipelined", "symm"):
        raise ValueError(f"unknown overlap backend {backend!r}; expected 'naive', 'pipelined' or 'symm'")
    c, e, B = case.config, case.dtype_bytes, case.batch
    d, n = c.hidden_size, norm_rows(case) * c.hidden_size
    saved, parts, grads = saved_activation_bytes(case), saved_parts(case), _grads(case)
    # The input norm keeps the block's input itself, which existed before the block ran: not new memory.
    x = kept_input_bytes(case)
    saved, parts = saved - x, {**parts, "norm": parts["norm"] - x}
    rows, cols = ffn_rows_cols(case)
    tile = ffn_tile_saved(case) if case.ffn_tile else 0  # the tile being recomputed holds what it would save
    ffn_whole, ffn_gathered = _fsdp_ffn(case)
    d_down = cols * d * e  # the down projection's weight gradient, made before SwiGLU's backward runs
    # After the FFN's backward: its saved tensors are released, its gradients made, and the gradient of the
    # norm's output (n) is in hand; after the attention's, only the input norm's saved tensors remain, with the
    # residual's gradient (n) beside the norm's.
    after_ffn = saved - parts["ffn"] + grads["ffn"] + n * e
    after_attention = parts["norm"] + grads["ffn"] + grads["attention"] + grads["norms"] // 2 + 2 * n * e
    moments = {
        "SwiGLU backward": saved + ffn_whole + d_down + swiglu_backward_bytes(case) + tile,
        "post-attention norm backward": after_ffn + norm_backward_bytes(case),
        "input norm backward": after_attention + norm_backward_bytes(case),
        "finalize_grads": sum(grads.values()) + n * e + sync_bytes(case),
    }
    if case.ffn_tile and ffn_tile_tokens(case, rows // B) < (case.seq if ffn_split(case) else case.shape.tokens):
        # From the second tile on, the tiles before have made the FFN's weight gradients and part of its input's
        # (n, each tile's slice padded to the whole input), and each new one is summed into them out of place:
        # the down projection's first (the new one and the sum, with the product's gradient), then SwiGLU's.
        acc = max(2 * d_down + rows * cols * e, swiglu_backward_bytes(case))
        moments["FFN tile gradient accumulation"] = saved + tile + grads["ffn"] + n * e + acc
    if ffn_whole:
        moments["FFN forward (FSDP2 gather)"] = (
            saved + B * case.shape.tokens * d * e + rows * cols * e + ffn_whole + ffn_gathered
        )
    if ffn_split(case) and case.spec.ffn_comm == GATHER_SCATTER and case.save_input == "shard" and case.world > 1:
        resident = saved - rows * cols * e + d_down + B * case.shape.tokens * d * e
        moments["FFN input GEMM backward"] = resident + input_gemm_backward(case, backend, 2 * cols)
    o_grad = 0
    shard = case.save_input == "shard" and case.world > 1
    if case.world > 1 and ffn_split(case) and case.spec.ffn_comm == GATHER_SCATTER:
        # Forward: every saved tensor exists, and the FFN's input shard too unless it is the one kept.
        shard_input = 0 if case.save_input == "shard" else B * case.shape.tokens * d * e
        moments["FFN output GEMM forward"] = saved + shard_input + output_gemm_forward(case, backend)
        moments["FFN output GEMM backward"] = saved + output_gemm_backward(case, backend, cols)
    if case.world > 1 and heads_split(case) and case.spec.attention_comm == GATHER_SCATTER:
        # After the FFN's and the post-attention norm's backward: their saved tensors released, their
        # gradients made, the residual's gradient in hand.
        resident = saved - parts["ffn"] - (parts["norm"] + x) + grads["ffn"] + grads["norms"] // 2 + n * e
        width = case.shape.q_heads * c.head_dim
        moments["attention output GEMM backward"] = resident + output_gemm_backward(case, backend, width)
    if heads_split(case) and case.spec.attention_comm == GATHER_SCATTER and shard:
        # After the attention core's backward: the input norm's rsqrt, the QKV GEMM's kept shard and weight
        # copy, the gradients of the FFN, the other norm and o_proj, the QKV output's gradient (every token
        # of this rank's heads), the residual's and the GEMM's input gradient.
        width = (case.shape.q_heads + 2 * case.shape.kv_heads) * c.head_dim
        o_grad = grads["attention"] - d * width * e
        resident = parts["norm"] + input_rows(case, GATHER_SCATTER) * d * e + d * width * e
        resident += grads["ffn"] + grads["norms"] // 2 + o_grad + B * case.seq * width * e + 2 * n * e
        moments["QKV input GEMM backward"] = resident + input_gemm_backward(case, backend, width)
    if case.ring > 1:
        # The ring's blocks in flight (odysseus.plan.ring): forward while the input norm and the attention have
        # saved theirs (the output being merged counted among them); backward after the FFN, the post-attention
        # norm and o_proj, with their gradients, the residual's and the attention output's gradients in hand.
        ring_fwd, ring_bwd = ring_transients(case)
        q_width = case.shape.q_heads * c.head_dim
        core = saved - parts["ffn"] - parts["norm"] - x
        # Forward: the attention's saved output does not exist yet, and its lse is the running one (in ring_fwd).
        made_later = B * case.seq * q_width * e + B * case.shape.q_heads * case.seq * FP32
        if not heads_split(case):  # nor does Ulysses' o_proj input (its own storage, after the all-to-all)
            made_later += B * case.shape.tokens * c.num_heads * c.head_dim * e
        else:  # the fused QKV output v was copied from is still referenced
            made_later -= B * case.seq * (case.shape.q_heads + 2 * case.shape.kv_heads) * c.head_dim * e
        moments["ring attention forward"] = core - made_later + ring_fwd
        o_grad = d * q_width * e
        resident = core + grads["ffn"] + grads["norms"] // 2 + o_grad + n * e + B * case.seq * q_width * e
        if not heads_split(case):  # Ulysses: o_proj's input is released by now
            resident -= B * case.shape.tokens * c.num_heads * c.head_dim * e
        moments["ring attention backward"] = resident + ring_bwd
    made = {
        "ring attention forward": 0,
        "ring attention backward": grads["ffn"] + grads["norms"] // 2 + d * case.shape.q_heads * c.head_dim * e,
        "SwiGLU backward": d_down,
        "post-attention norm backward": grads["ffn"] + grads["norms"] // 2,
        "input norm backward": grads["ffn"] + grads["attention"] + grads["norms"],
        "finalize_grads": sum(grads.values()),
        "FFN forward (FSDP2 gather)": 0,
        "FFN tile gradient accumulation": grads["ffn"],
        "FFN input GEMM backward": d_down,
        "FFN output GEMM forward": 0,
        "FFN output GEMM backward": 0,
        "attention output GEMM backward": grads["ffn"] + grads["norms"] // 2,
        "QKV input GEMM backward": grads["ffn"] + grads["norms"] // 2 + o_grad,
    }
    where = max(moments, key=moments.get)
    return Peak(moments[where], where, moments, {k: made[k] for k in moments})
