"""Run a parallel module and its dense reference on the same input: the harness of the tests and the demo.

Both runs take the full input ``x: (batch, seq, hidden)`` and an output gradient ``gy`` of the same shape.
The parallel module is fed what its layout wants (the full sequence for TP, this rank's
``shard_sequence`` shard otherwise); its output is gathered back, its gradients finalized and assembled into
dense tensors, so a :class:`Run` of either side can be compared entry by entry. Collective: call on every
rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .comm import gather_sequence, shard_sequence
from .training.state import dense_state_dict, finalize_grads


@dataclass
class Run:
    """What one forward + backward produced: the full output, the input's gradient, every weight gradient."""

    output: torch.Tensor
    input_grad: torch.Tensor
    grads: dict[str, torch.Tensor]


def run_reference(ref: nn.Module, x: torch.Tensor, gy: torch.Tensor, position_ids=None) -> Run:
    """``ref(x)`` backward ``gy`` on one device (``ref``'s gradients are accumulated into)."""
    xr = x.detach().clone().requires_grad_()
    y = ref(xr) if position_ids is None else ref(xr, position_ids)
    y.backward(gy)
    return Run(y.detach(), xr.grad, {k: p.grad for k, p in ref.named_parameters()})


def run_parallel(par: nn.Module, x: torch.Tensor, gy: torch.Tensor, position_ids=None) -> Run:
    """``par`` on its share of ``x``, backward with the sum of the ranks' local losses ``<y, gy>``.

    TP: every rank computes the replicated loss whole. Sequence-split: each rank's loss covers its tokens
    and the global loss is their sum. Gradients are finalized (:func:`odysseus.finalize_grads`) and returned
    dense. On a 2-D mesh ``x`` is this replica's batch (split over the module's ``sp`` group, or ``ring x sp``
    with a ring), and the gradients are summed over the replicas.
    """
    xp = x.detach().clone().requires_grad_()
    split, pg = par.sequence_split, par.pg  # the module's own group (a 2-D mesh's sp group)
    if par.mesh.ring is not None:  # the sequence is laid out over ring x sp
        pg = par.mesh

    def mine(t):
        return shard_sequence(t, pg) if split else t

    args = () if position_ids is None else (mine(position_ids),)
    y = par(mine(xp), *args)
    (y * mine(gy)).sum().backward()
    finalize_grads(par)
    full = gather_sequence(y.detach(), pg) if split else y.detach()
    return Run(full, xp.grad, dense_state_dict(par, grad=True))


def relative_errors(ours: Run, want: Run) -> dict[str, float]:
    """``max |ours - want| / max |want|`` (fp64) for the output, the input gradient and every weight gradient."""
    pairs = {"output": (ours.output, want.output), "x.grad": (ours.input_grad, want.input_grad)}
    pairs.update({k: (ours.grads[k], g) for k, g in want.grads.items()})
    return {
        k: ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
        for k, (a, b) in pairs.items()
    }
