"""SwiGLU ``silu(gate) * up`` as one autograd function that keeps only ``gate`` and ``up`` for backward.

Autograd's composition keeps ``gate`` (for silu's backward) and also ``silu(gate)`` and ``up`` (for the
product's), one more tensor of the FFN's width per token than backward needs: ``silu(gate)`` is
recomputed from ``gate``. The backward computes in at least fp32 and rounds once, so 16-bit gradients are
no less accurate than autograd's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        compute = torch.promote_types(gate.dtype, torch.float32)
        g, u, d = gate.to(compute), up.to(compute), grad.to(compute)
        sig = torch.sigmoid(g)
        silu = g * sig
        d_gate = d * u * sig * (1 + g * (1 - sig))  # silu'(g) = sig * (1 + g * (1 - sig))
        return d_gate.to(gate.dtype), (d * silu).to(up.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (same shapes), saving only ``gate`` and ``up`` for backward."""
    return _SwiGLU.apply(gate, up)
