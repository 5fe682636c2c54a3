"""RMSNorm as one autograd function that keeps the 16-bit input and the fp32 ``rsqrt`` for backward.

The reference composition (Hugging Face's: upcast, ``x * rsqrt(mean(x^2) + eps)``, cast back, times the
weight) leaves autograd holding an fp32 copy of the input, the fp32 normalised input and the 16-bit one:
``(4 + 4 + 2) x d`` bytes per token in bf16, where backward needs only the input and one fp32 number per
token. Backward recomputes the normalised input from those, in at least fp32, and rounds where forward
did, so the gradients equal the composition's to fp32 rounding.
"""

from __future__ import annotations

import torch
from torch import nn


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        xc = x.to(compute)
        r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (xc * r).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        compute = r.dtype
        x_hat = x.to(compute) * r  # the normalised input, recomputed
        grad_w = None
        if ctx.needs_input_grad[1]:
            # d/dw of w * round(x_hat): summed over every token, in the weight's dtype as autograd would.
            grad_w = (grad * x_hat.to(x.dtype)).sum(dim=tuple(range(grad.dim() - 1))).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # The gradient reaches the normalised input in the input's dtype (forward rounded it there).
            g = (grad * weight).to(x.dtype).to(compute)
            # d/dx of x * r with r = (mean(x^2) + eps)^-1/2: r * (g - x_hat * mean(g * x_hat)).
            dot = (g * x_hat).mean(-1, keepdim=True)
            grad_x = g.sub_(x_hat.mul_(dot)).mul_(r).to(x.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, ``x: (..., hidden)``, ``weight: (hidden,)``."""
    return _RMSNorm.apply(x, weight, eps)


class FusedRMSNorm(nn.Module):
    """``y = w * x / sqrt(mean(x^2) + eps)`` like :class:`odysseus.reference.RMSNorm` (same parameter, same
    numbers), keeping only ``x`` and one fp32 number per token for backward."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., hidden)`` -> same shape."""
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
