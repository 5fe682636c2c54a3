"""``parallelize(module, strategy, group)``: this rank's share of a reference block, attention or FFN.

The strategy's modules come from the registry (:mod:`odysseus.strategies.registry`); checkpoints and
gradients are handled in :mod:`odysseus.training.state`.
"""

from __future__ import annotations

from torch import nn

from .. import reference
from ..comm.mesh import resolve_group
from ..comm.weights import check_same_weights, whole_model_group
from ..overlap import Ring
from ..strategies import registry
from ..strategies.block import ParallelBlock
from ..strategies.module import ParallelModule
from .state import dense_state_dict, finalize_grads, zero3

STRATEGIES = registry.STRATEGIES

__all__ = ["STRATEGIES", "ParallelBlock", "dense_state_dict", "finalize_grads", "parallelize", "zero3"]


def parallelize(
    module: nn.Module,
    strategy: str,
    group=None,
    *,
    backend: str = "auto",
    check_finite: bool = False,
    check_inputs: bool | None = None,
    check_weights: bool = True,
    save_input: str = "gathered",
    ring: Ring | None = None,
    ffn_tile: int | None = None,
    checkpoint: bool = False,
    offload: bool = False,
) -> nn.Module:
    """This rank's share of a reference ``TransformerBlock``, ``Attention`` or ``FFN`` under ``strategy``.

    ``group``: a ProcessGroup, a 1-D DeviceMesh, or None for the default group; or a 2-D mesh, data-parallel x
    sequence-parallel: a ``DeviceMesh`` with dims named e.g. ``("dp", "sp")`` or a ``(dp_group, sp_group)`` pair
    (:mod:`odysseus.comm.mesh`). The strategy then runs over ``sp``; each ``dp`` replica is fed its own batch,
    and :func:`finalize_grads` sums every gradient over ``dp`` too. A ``DeviceMesh`` with dims named
    ``("ring", "sp")`` or ``("dp", "ring", "sp")`` adds ring attention over ``ring`` (README, "Past the head
    count, across nodes"); feed it ``shard_sequence(x, mesh)``. ``backend`` picks how
    all-gather/reduce-scatter overlap with the GEMMs in TP-SP and Odysseus (see :mod:`odysseus.overlap`);
    ``save_input`` whether their all-gather⊗GEMMs keep the gathered input for backward (``"gathered"``) or
    only this rank's shard, re-gathering it and streaming every gather through a ``ring`` of slots
    (``"shard"``: activations at 1/N, one more all-gather per op in backward);
    ``check_finite=True`` rejects inputs holding NaN or Inf. ``check_inputs`` compares a fingerprint of the
    ranks' inputs, so that the whole sequence fed to every rank of a sequence-split module (which looks like a
    valid split of a longer one) or different inputs fed to ``"tp"`` raise on every rank: by default (None)
    the returned module's input, inside the length exchange its first module makes anyway, without making
    the host wait for the device (on an accelerator, each call then compares the previous call's inputs;
    docs/RELIABILITY.md gives the rule); ``True`` every module's input, at once (a host wait per module);
    ``False`` none. ``check_weights`` (default True): compare a fingerprint of every weight of ``module``
    across the ranks once, here (one collective over every rank of the mesh), and raise ``ValueError`` naming
    the first that differs, since each rank takes its share of its own copy; ``False`` skips it.
    ``ffn_tile``: the FFN runs that many tokens per rank at a time, each tile recomputed in backward.
    ``checkpoint`` (a block only): keep only the block's input for backward and recompute the rest;
    ``offload``: that input waits in host memory.
    For ``"tp"`` every rank is fed the full sequence; for the others its :func:`shard_sequence` shard.
    """
    spec = registry.get(strategy)
    resolve_group(group)  # the modules check the backend and save_input (ParallelModule)
    if check_weights and isinstance(module, (reference.TransformerBlock, reference.Attention, reference.FFN)):
        check_same_weights(module.named_parameters(), whole_model_group(group), f"parallelize({strategy!r})")
    kwargs = dict(
        backend=backend, check_finite=check_finite, check_inputs=check_inputs, save_input=save_input, ring=ring,
        ffn_tile=ffn_tile,
    )  # fmt: skip
    if isinstance(module, reference.TransformerBlock):
        return ParallelBlock.from_dense(module, strategy, group, checkpoint=checkpoint, offload=offload, **kwargs)
    if checkpoint or offload:
        raise ValueError(
            f"checkpoint/offload apply to a whole block (reference.TransformerBlock), got a {type(module).__name__}"
        )
    attn_cls, ffn_cls = spec.modules()
    if isinstance(module, reference.Attention):
        return attn_cls.from_dense(module, group, **kwargs)
    if isinstance(module, reference.FFN):
        return ffn_cls.from_dense(module, group, **kwargs)
    if isinstance(module, (ParallelModule, ParallelBlock)):
        raise TypeError(
            f"{type(module).__name__} is already parallelized ({module.extra_repr()}); "
            "parallelize the reference module instead"
        )
    raise TypeError(
        f"cannot parallelize a {type(module).__name__}; expected odysseus.reference.TransformerBlock, "
        "Attention or FFN (for Hugging Face models use odysseus.integrations.hf.parallelize_llama)"
    )
