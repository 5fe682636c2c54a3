"""The next-token loss of a sequence-split model: labels shifted across shard boundaries, one global mean (over
every data-parallel replica's batch on a 2-D mesh)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import primitives
from ..comm.groups import group_rank, group_size, resolve_group
from ..comm.mesh import resolve_mesh
from ..layout import offsets, shard_sizes
from .hf import layers, model_setup

__all__ = ["causal_lm_loss", "global_loss", "shift_labels_for_shard"]


def _shift(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``labels: (batch, seq)`` -> the next token's label at every position, ``ignore_index`` at the last."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)


def shift_labels_for_shard(labels: torch.Tensor, group=None, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets of this rank's tokens: ``labels: (batch, seq)``, the same full tensor on every rank,
    -> ``(batch, seq_local)``, the shard :func:`odysseus.shard_sequence` gives of ``labels[:, 1:]`` followed by
    ``ignore_index``.

    So the target of the last token of rank r's shard is the first label of rank r+1's shard, and the last
    token of the sequence has none. Pass ``input_ids`` as ``labels`` for plain language modelling.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (batch, seq), got shape {tuple(labels.shape)}")
    pg = resolve_group(group)
    shifted = _shift(labels, ignore_index)
    sizes = shard_sizes(labels.shape[1], group_size(pg))
    if min(sizes) == 0:
        raise ValueError(f"a sequence of {labels.shape[1]} tokens cannot be split over {len(sizes)} ranks")
    rank = group_rank(pg)
    return shifted[:, offsets(sizes)[rank] : offsets(sizes)[rank + 1]]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, group=None, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy, as this rank's term of the global mean loss (fp32 scalar).

    ``logits``: ``(batch, seq_local, vocab)`` from a sequence-split model, or ``(batch, seq, vocab)`` from a
    ``"tp"`` model (told apart by their length). ``labels: (batch, seq)``: the full labels (or ``input_ids``),
    the same on every rank of the group, ``ignore_index`` where no loss is wanted. ``group``: the model's group
    or 2-D mesh.

    Sequence-split: returns ``sum of this rank's token losses / number of target tokens in the whole batch``,
    so the sum over ranks is the mean loss of the unsplit model (what ``LlamaForCausalLM(labels=...)`` gives);
    call ``backward()`` on it on every rank. Full logits: returns that mean loss itself, identical on every
    rank. The count needs no communication, as every rank holds the full labels.

    On a 2-D mesh each data-parallel replica brings its own batch and the count covers all of them (one
    all-reduce of an int over ``dp``, so call it on every rank): the sum of the returned terms over every rank
    of the mesh is the mean loss of the unsplit model on the replicas' batches concatenated.
    """
    mesh = resolve_mesh(group)
    pg = mesh.sp
    labels = labels.to(logits.device)
    world, L = group_size(pg), labels.shape[-1]
    if logits.dim() != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not fit labels of shape {tuple(labels.shape)}: "
            "expected (batch, seq or seq_local, vocab) with the labels' batch"
        )
    if logits.shape[1] == L:
        targets = _shift(labels, ignore_index)
    else:
        targets = shift_labels_for_shard(labels, pg, ignore_index)
        if logits.shape[1] != targets.shape[1]:
            raise ValueError(
                f"logits hold {logits.shape[1]} tokens; with labels of {L} tokens over {world} ranks rank "
                f"{group_rank(pg)} expects its shard of {targets.shape[1]} tokens (or all {L} for 'tp')"
            )
    count = (labels[:, 1:] != ignore_index).sum()
    if mesh.data_parallel:
        count = primitives.all_reduce(count, mesh.dp, category="metadata", label="token count")
    count = count.clamp_min(1)
    # fp32 logits, as Hugging Face's loss: bf16 log-softmax over a large vocabulary loses the small terms.
    total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="sum")
    return total / count


def global_loss(loss: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The global loss value for logging (detached): the sum of the ranks' ``loss`` for sequence-split
    strategies, ``loss`` itself for ``"tp"``; on a 2-D mesh, summed over the data-parallel replicas too.
    Collective for sequence-split strategies and on a 2-D mesh."""
    spec, pg = model_setup(model)
    value = loss.detach().clone()
    if spec.sequence_split:
        value = primitives.all_reduce(value, pg, category="metadata", label="loss")
    mesh = layers(model)[0].mesh
    if mesh.data_parallel:
        value = primitives.all_reduce(value, mesh.dp, category="metadata", label="loss")
    return value
