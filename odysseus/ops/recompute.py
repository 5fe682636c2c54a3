"""Recomputation: keep a function's inputs, not what it saves, and redo it in backward.

:func:`recompute` wraps ``torch.utils.checkpoint`` (non-reentrant, so custom ops, FSDP2 and nested calls
work): the collectives a recomputed forward issues again are recorded in the CommLedger under the phase
``"recompute"``. With ``offload`` the inputs it keeps go to host memory (pinned on CUDA) until backward.
Layer checkpointing (``ParallelBlock(checkpoint=True)``) and the tiled FFNs use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from ..comm.ledger import phase


def _contexts():
    # (forward context, recomputation context): collectives re-run in backward are counted apart.
    return contextlib.nullcontext(), phase("recompute")


def recompute(fn: Callable[..., torch.Tensor], *args, offload: bool = False) -> torch.Tensor:
    """``fn(*args)``, saving only ``args`` for backward (offloaded to host memory with ``offload``)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    keep = (
        torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if offload else contextlib.nullcontext()
    )
    with keep:
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)
