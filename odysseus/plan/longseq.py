"""The long-sequence terms of a model step: layer checkpointing, host offload, the tiled FFN, the chunked loss.

:class:`LongSeq` holds the options as the library takes them (``parallelize_llama(checkpoint=, offload=,
ffn_tile=)``, ``model_loss(chunk=)``). :func:`stack_peak` is the most device bytes alive at once in a step of
``layers`` blocks, the final norm and the LM head + loss on one rank, beyond the weights and the first block's
input (``perf/longseq_memory.py`` checks it against ``odysseus.training.memtrack.MemoryTracker``), and the host bytes
offload keeps. Its moments, each what is resident then plus that moment's transient:

- **head forward** (every block done): what the blocks keep (each block's saved tensors; with
  ``checkpoint`` only each block's input, on the host with ``offload``), the last block's output, the final
  norm's rsqrt and output, and the loss's transient: full logits ``R x V`` in the activations' dtype, their
  fp32 copy and the fp32 log-softmax; chunked (``odysseus.ops.chunked_loss``) the fp32 logits and softmax of one
  chunk.
- **head backward**: full logits: the kept fp32 log-softmax, the fp32 gradients of the loss and of the
  log-softmax (12 bytes per logit); chunked: the hidden states' gradient, the head's weight gradient summed in
  fp32, and one chunk's recomputed logits, softmax and its gradient (or the chunk's fp32 weight-gradient
  product, or the final cast).
- **final norm backward** and **block k backward** for every k (the lower blocks still keep theirs, the upper
  ones' gradients are made): ``odysseus.plan.block_peak``'s moments (with ``checkpoint`` the block's saved
  tensors are recomputed, so one block's exist at a time; with ``offload`` its input is copied back first).

``R``: this rank's tokens of the loss (its shard, or every token for TP, whose LM head is whole on every rank
as ``parallelize_llama`` leaves it). ``ffn_tile`` enters through :class:`~odysseus.plan.case.Case`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..strategies.registry import GATHER_SCATTER
from .case import Case
from .cost import Cost, _gemms, block_cost, comm_time
from .forms import expected_collectives
from .memory import FP32, _grads, block_peak, kept_input_bytes, norm_backward_bytes, norm_rows, saved_activation_bytes
from .presets import Assumptions, Hardware, Model


@dataclass(frozen=True)
class LongSeq:
    """The long-sequence options of a training step (the library's names)."""

    checkpoint: bool = False
    """Each layer keeps only its input and is recomputed in backward (one more forward, collectives included)."""
    offload: bool = False
    """The kept layer inputs wait in host memory (needs ``checkpoint``)."""
    ffn_tile: int | None = None
    """Tokens per rank of one FFN tile (each tile recomputed in backward)."""
    loss_chunk: int | None = None
    """Tokens per chunk of the LM head and loss (``model_loss(chunk=)``); None: full logits."""

    def __post_init__(self) -> None:
        if self.offload and not self.checkpoint:
            raise ValueError("offload=True offloads the inputs checkpointed layers keep: it needs checkpoint=True")
        for name in ("ffn_tile", "loss_chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive number of tokens or None")

    def label(self) -> str:
        """Short name, e.g. ``checkpoint+offload+ffn_tile=4096+loss_chunk=4096`` (``none``)."""
        parts = [k for k in ("checkpoint", "offload") if getattr(self, k)]
        parts += [f"{k}={getattr(self, k)}" for k in ("ffn_tile", "loss_chunk") if getattr(self, k)]
        return "+".join(parts) or "none"


@dataclass(frozen=True)
class StackPeak:
    """The peak of a step of a stack of blocks + final norm + LM head and loss on one rank (bytes)."""

    bytes: int
    moment: str
    moments: dict[str, int]
    """Every candidate moment: device bytes beyond the weights and the first block's input."""
    kept: dict[str, int]
    """Of each moment, what the blocks keep for backward (the rest is that moment's transient)."""
    gradients: dict[str, int]
    """Of each moment, the weight gradients made by then (a model counts them with its gradients)."""
    host: int
    """Host bytes at the end of forward: every kept layer input with ``offload``."""


def loss_transients(case: Case, vocab: int, chunk: int | None) -> tuple[int, int]:
    """(forward, backward) transient bytes of the LM head + loss on ``case.rank`` beyond the hidden states it
    reads, excluding the head's weight gradient (see the module docstring)."""
    R, d, e = norm_rows(case), case.config.hidden_size, case.dtype_bytes
    if chunk is None:
        return (e + 2 * FP32) * R * vocab, 3 * FP32 * R * vocab
    c = min(chunk, R)
    grad_w = FP32 * vocab * d  # the head's weight gradient, summed over chunks in fp32
    chunk_bwd = max((2 * FP32 + e) * c * vocab, e * c * vocab + (e + FP32) * vocab * d, e * vocab * d)
    return 2 * FP32 * c * vocab, R * d * e + grad_w + chunk_bwd


def stack_peak(case: Case, layers: int, vocab: int, opt: LongSeq, backend: str = "pipelined") -> StackPeak:
    """The peak of forward + backward of ``layers`` blocks (``case``), the final norm and the LM head and loss
    (``vocab`` outputs, a whole weight) on ``case.rank``, under ``opt`` (see the module docstring)."""
    case = dataclasses.replace(case, ffn_tile=opt.ffn_tile)
    R, d, e = norm_rows(case), case.config.hidden_size, case.dtype_bytes
    n, S = kept_input_bytes(case), saved_activation_bytes(case)
    peak = block_peak(case, backend)
    G, head_grad = sum(_grads(case).values()), vocab * d * e
    loss_fwd, loss_bwd = loss_transients(case, vocab, opt.loss_chunk)
    kept_layer = n if opt.checkpoint else S
    # The first block's input existed before the step: the blocks keep layers x kept_layer less it.
    kept_all = 0 if opt.offload else layers * kept_layer - n
    norm_kept = 2 * n + FP32 * R  # the last block's output and the rsqrt the final norm keeps; its output
    moments = {"head forward": kept_all + norm_kept + loss_fwd, "head backward": kept_all + norm_kept + loss_bwd}
    kept = dict.fromkeys(moments, kept_all)
    grads = dict.fromkeys(moments, 0)
    moments["final norm backward"] = kept_all + norm_kept - n + n + norm_backward_bytes(case) + head_grad
    kept["final norm backward"], grads["final norm backward"] = kept_all, head_grad + d * e
    for k in range(1, layers + 1):
        # Blocks below k keep theirs; block k's input is the one below's output (checkpointed: copied back from
        # the host with offload); its output's gradient is in hand; blocks above have made their gradients.
        below = n if opt.offload else (k - 1) * kept_layer
        above = head_grad + d * e + (layers - k) * G
        for name, value in peak.moments.items():
            if name == "finalize_grads":
                continue
            key = f"block {k} backward: {name}"
            moments[key], kept[key], grads[key] = below + n + value + above, below, above + peak.gradients[name]
    where = max(moments, key=moments.get)
    host = layers * n if opt.offload else 0
    return StackPeak(moments[where], where, moments, kept, grads, host)


def longseq_cost(model: Model, case: Case, hw: Hardware, a: Assumptions, backend: str, opt: LongSeq) -> Cost:
    """Time ``opt`` adds to :func:`~odysseus.plan.cost.model_step` with ``recompute=opt.checkpoint`` (which
    already reruns every block's forward, collectives included): the tiled FFN's own recomputation (one more
    FFN forward with its collectives; with ``checkpoint`` too the FFN runs three times), the chunked loss's
    recomputed logits, and the offload copies' time beyond each layer's compute (they overlap with it)."""
    cost = Cost()
    rate = hw.peak_flops * a.gemm_efficiency
    if opt.ffn_tile is not None:
        tiled = dataclasses.replace(case, ffn_tile=opt.ffn_tile)
        flops = sum(g.flops for g in _gemms(case) if g.name.startswith("ffn."))
        cost += Cost(compute_s=flops / rate, flops=flops)
        f = a.overlap.get(backend, 0.0) if case.spec.ffn_comm == GATHER_SCATTER else 0.0
        for x in expected_collectives(tiled):
            if x.phase == "forward" and x.label.startswith("ffn."):
                t = comm_time(x.bytes_received, x.op, case.world, hw, a)
                cost += Cost(exposed_comm_s=t * (1 - f), link_s=t, comm_bytes=x.bytes_received, collectives=1)
        cost = cost * model.num_layers
    if opt.loss_chunk is not None:  # the LM head's forward again, chunk by chunk, in backward
        flops = 2 * case.batch * case.seq * case.config.hidden_size * model.vocab_size / case.world
        cost += Cost(compute_s=flops / rate, flops=flops)
    if opt.offload:
        if hw.host_bw is None:
            raise ValueError(f"hardware {hw.name!r} has no host_bw: offload cannot be planned")
        t = kept_input_bytes(case) / (hw.host_bw * a.host_link_efficiency)  # one layer input, each way
        once, twice = (block_cost(case, hw, a, backend, rc).compute_s for rc in (False, True))
        forward = twice - once  # forward compute of one block; backward (with the recomputation) the rest
        exposed = max(0.0, t - forward) + max(0.0, t - (twice - forward))
        cost += Cost(exposed_comm_s=exposed * model.num_layers)
    return cost
