"""SwiGLU ``silu(gate) * up`` as one autograd function that keeps only ``gate`` and ``up`` for backward.

Autograd's composition keeps ``gate`` (for silu's backward) and also ``silu(gate)`` and ``up`` (for the
product's), one more tensor of the FFN's width per token than backward needs: ``silu(gate)`` is
recomputed from ``gate``. The backward computes in at least fp32 and rounds once, so 16-bit gradients are
no less accurate than autograd's, and holds two fp32 tensors of the FFN's width at a time (12 bytes per
element with the 16-bit results), where a plain fp32 recomputation holds eight.
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
        # Two fp32 tensors of the FFN's width at a time: the 16-bit operands enter the fp32 products as they
        # are (exact upcasts), and each gradient is built in place and rounded once.
        sig = torch.sigmoid(gate.to(compute))
        d_up = torch.mul(sig, gate).mul_(grad).to(up.dtype)  # d * silu(g)
        # silu'(g) = sig * (1 + g * (1 - sig))
        d_gate = torch.sub(1, sig).mul_(gate).add_(1).mul_(sig).mul_(up).mul_(grad).to(gate.dtype)
        return d_gate, d_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (same shapes), saving only ``gate`` and ``up`` for backward."""
    return _SwiGLU.apply(gate, up)
