"""The next-token loss of a sequence-split model: labels shifted across shard boundaries, one global mean (over
every data-parallel replica's batch on a 2-D mesh)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import primitives
from ..comm.groups import group_rank, group_size
from ..comm.mesh import Mesh, check_default_group, resolve_group, resolve_mesh, ring_mesh
from ..comm.ring_layout import shard_ring
from ..layout import offsets, shard_sizes
from ..ops.chunked_loss import linear_cross_entropy
from .hf_layer import layers, model_setup

__all__ = ["causal_lm_loss", "global_loss", "lm_head_loss", "model_loss", "shift_labels_for_shard"]


def _shift(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``labels: (batch, seq)`` -> the next token's label at every position, ``ignore_index`` at the last."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)


def shift_labels_for_shard(labels: torch.Tensor, group=None, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets of this rank's tokens: ``labels: (batch, seq)``, the same full tensor on every rank,
    -> ``(batch, seq_local)``, the shard :func:`odysseus.shard_sequence` gives of ``labels[:, 1:]`` followed by
    ``ignore_index``.

    So the target of the last token of rank r's shard is the first label of rank r+1's shard, and the last
    token of the sequence has none. Pass ``input_ids`` as ``labels`` for plain language modelling. On a mesh with
    a ring, this rank's tokens of the ring layout (the same targets, where its tokens lie in the sequence).
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (batch, seq), got shape {tuple(labels.shape)}")
    shifted = _shift(labels, ignore_index)
    if ring_mesh(group) is not None:
        return shard_ring(shifted, ring_mesh(group), 1)
    pg = resolve_group(group)
    sizes = shard_sizes(labels.shape[1], group_size(pg))
    if min(sizes) == 0:
        raise ValueError(f"a sequence of {labels.shape[1]} tokens cannot be split over {len(sizes)} ranks")
    rank = group_rank(pg)
    return shifted[:, offsets(sizes)[rank] : offsets(sizes)[rank + 1]]


def _targets(tokens: int, labels: torch.Tensor, mesh: Mesh, ignore_index: int, what: str) -> torch.Tensor:
    """This rank's next-token targets for ``tokens`` outputs: ``(batch, tokens)``, all of them (``"tp"``) or
    this rank's shard; raises when ``tokens`` is neither."""
    L = labels.shape[-1]
    if tokens == L and mesh.ring is None:
        return _shift(labels, ignore_index)
    targets = shift_labels_for_shard(labels, mesh if mesh.ring is not None else mesh.sp, ignore_index)
    if tokens != targets.shape[1]:
        raise ValueError(
            f"{what} hold {tokens} tokens; with labels of {L} tokens over {group_size(mesh.seq)} ranks rank "
            f"{group_rank(mesh.seq)} expects its shard of {targets.shape[1]} tokens (or all {L} for 'tp')"
        )
    return targets


def _count(labels: torch.Tensor, ignore_index: int, mesh: Mesh) -> torch.Tensor:
    """Target tokens in the whole batch: every rank of a replica holds its full labels; on a 2-D mesh the
    replicas' counts are summed over ``dp``."""
    count = (labels[:, 1:] != ignore_index).sum()
    if mesh.data_parallel:
        count = primitives.all_reduce(count, mesh.dp, category="metadata", label="token count")
    return count.clamp_min(1)


def _check_batch(t: torch.Tensor, labels: torch.Tensor, what: str, last: str) -> None:
    if t.dim() != 3 or labels.dim() != 2 or t.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{what} of shape {tuple(t.shape)} do not fit labels of shape {tuple(labels.shape)}: "
            f"expected (batch, seq or seq_local, {last}) with the labels' (batch, seq)"
        )


def _prepare(
    t: torch.Tensor, labels: torch.Tensor, group, ignore_index: int, who: str, what: str, last: str
) -> tuple[Mesh, torch.Tensor, torch.Tensor]:
    """(mesh, labels on ``t``'s device, this rank's shifted targets) for a loss over ``t`` ``(batch, seq_local,
    last)``; a missing group is refused where a model of this process runs over a 2-D mesh."""
    if group is None:
        check_default_group(who)
    mesh = resolve_mesh(group)
    labels = labels.to(t.device)
    _check_batch(t, labels, what, last)
    return mesh, labels, _targets(t.shape[1], labels, mesh, ignore_index, what)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, group=None, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy, as this rank's term of the global mean loss (fp32 scalar).

    ``logits``: ``(batch, seq_local, vocab)`` from a sequence-split model, or ``(batch, seq, vocab)`` from a
    ``"tp"`` model (told apart by their length). ``labels: (batch, seq)``: the full labels (or ``input_ids``),
    the same on every rank of the group, ``ignore_index`` where no loss is wanted. ``group``: the model's group
    or 2-D mesh.

    Sequence-split: returns ``sum of this rank's token losses / number of target tokens in the whole batch``,
    so the sum over ranks is the mean loss of the unsplit model (what ``LlamaForCausalLM(labels=...)`` gives);
    call ``backward()`` on it on every rank. Full logits: returns that mean loss itself, identical on every
    rank. At long sequences use :func:`lm_head_loss`, which never holds the logits.

    On a 2-D mesh each data-parallel replica brings its own batch and the count covers all of them (one
    all-reduce of an int over ``dp``, so call it on every rank): the sum of the returned terms over every rank
    of the mesh is the mean loss of the unsplit model on the replicas' batches concatenated.
    """
    mesh, labels, targets = _prepare(logits, labels, group, ignore_index, "causal_lm_loss", "logits", "vocab")
    # fp32 logits, as Hugging Face's loss: bf16 log-softmax over a large vocabulary loses the small terms.
    total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="sum")
    return total / _count(labels, ignore_index, mesh)


def lm_head_loss(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    group=None,
    *,
    chunk: int = 4096,
    impl: str = "auto",
    ignore_index: int = -100,
) -> torch.Tensor:
    """:func:`causal_lm_loss` of ``head(hidden)`` without the logits: the LM head and the loss run
    ``chunk`` tokens at a time and are recomputed in backward (:func:`odysseus.ops.chunked_loss.linear_cross_entropy`;
    ``impl="auto"`` uses Liger-Kernel's fused kernel on CUDA when it is installed).

    ``hidden``: the final hidden states (after the last norm), ``(batch, seq_local, hidden)``, or
    ``(batch, seq, hidden)`` for ``"tp"``; ``head``: the model's LM head (``model.get_output_embeddings()``);
    ``labels: (batch, seq)`` as for :func:`causal_lm_loss`, whose loss and gradients this equals.
    """
    mesh, labels, targets = _prepare(hidden, labels, group, ignore_index, "lm_head_loss", "hidden states", "hidden")
    total = linear_cross_entropy(
        hidden, head.weight, targets, head.bias, chunk=chunk, ignore_index=ignore_index, impl=impl
    )
    return total / _count(labels, ignore_index, mesh)


def model_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    chunk: int = 4096,
    impl: str = "auto",
    ignore_index: int = -100,
) -> torch.Tensor:
    """This rank's term of the global mean loss of a :func:`parallelize_llama` causal LM, without the logits.

    Runs ``model``'s base model on ``input_ids`` (this rank's shard, or the full ids for ``"tp"``; the same
    ``position_ids`` layout) and :func:`lm_head_loss` on its last hidden state with ``model``'s LM head.
    Equals ``causal_lm_loss(model(input_ids).logits, labels)``.
    """
    model_setup(model)  # raises unless the model was parallelized
    base, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if base is None or base is model or not isinstance(head, nn.Linear):
        raise ValueError(
            f"{type(model).__name__} is not a causal LM with a base model and a linear LM head; "
            "call lm_head_loss on its hidden states"
        )
    hidden = base(input_ids=input_ids, position_ids=position_ids).last_hidden_state
    return lm_head_loss(hidden, head, labels, layers(model)[0].mesh, chunk=chunk, impl=impl, ignore_index=ignore_index)


def global_loss(loss: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The global loss value for logging (detached): the sum of the ranks' ``loss`` for sequence-split
    strategies, ``loss`` itself for ``"tp"``; on a 2-D mesh, summed over the data-parallel replicas too.
    Collective for sequence-split strategies and on a 2-D mesh."""
    spec, _ = model_setup(model)
    value = loss.detach().clone()
    mesh = layers(model)[0].mesh
    if spec.sequence_split:  # over every rank that holds a part of the sequence: sp, or ring x sp
        value = primitives.all_reduce(value, mesh.seq, category="metadata", label="loss")
    if mesh.data_parallel:
        value = primitives.all_reduce(value, mesh.dp, category="metadata", label="loss")
    return value
