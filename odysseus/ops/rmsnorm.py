"""RMSNorm as one autograd function that keeps the 16-bit input and the fp32 ``rsqrt`` for backward.

The reference composition (Hugging Face's: upcast, ``x * rsqrt(mean(x^2) + eps)``, cast back, times the
weight) leaves autograd holding an fp32 copy of the input, the fp32 normalised input and the 16-bit one:
``(4 + 4 + 2) x d`` bytes per token in bf16, where backward needs only the input and one fp32 number per
token. Backward recomputes the normalised input from those, in at least fp32, and rounds where forward
did, so the gradients equal the composition's to fp32 rounding. Forward and backward work through
``layout.RMSNORM_CHUNK_ROWS`` rows at a time, so their fp32 temporaries stay small at any sequence length.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import layout


def _token_chunks(x: torch.Tensor) -> list[tuple]:
    """Index tuples of ``x``'s token dim (-2) in chunks of ``layout.norm_chunk_tokens`` tokens, across the
    leading dims: slices, never copies of a strided tensor (one chunk for a 1-D input)."""
    if x.dim() < 2:
        return [(...,)]
    tokens = layout.norm_chunk_tokens(x.shape)
    return [(..., slice(a, a + tokens), slice(None)) for a in range(0, x.shape[-2], tokens)]


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        r = torch.empty((*x.shape[:-1], 1), dtype=compute, device=x.device)
        for t in _token_chunks(x):
            _chunk_forward(x[t], weight, eps, out[t], r[t])
        ctx.save_for_backward(x, weight, r)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = torch.empty_like(x) if need_x else None
        # d/dw of w * round(x_hat), summed over every token: chunk sums added in fp32, rounded once.
        grad_w = torch.zeros(x.shape[-1], dtype=r.dtype, device=x.device) if need_w else None
        for t in _token_chunks(x):
            _chunk_backward(x[t], r[t], grad[t], weight, grad_x[t] if need_x else None, grad_w)
        return grad_x, grad_w.to(weight.dtype) if need_w else None, None


def _chunk_forward(x, weight, eps, out, r) -> None:
    """One chunk of forward, the reference's ops in its order (so the values are bit for bit its): the
    rsqrt into ``r``, ``weight * round(x * r)`` into ``out``; its fp32 temporaries are freed on return."""
    xc = x.to(r.dtype)
    r.copy_(torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps))
    out.copy_(weight * (xc * r).to(x.dtype))


def _chunk_backward(x, r, grad, weight, grad_x, grad_w) -> None:
    """Write one chunk's input gradient into ``grad_x`` and add its weight gradient to ``grad_w`` (fp32).

    A function of its own so that its fp32 temporaries are freed on return, before the next chunk's exist.
    """
    compute = r.dtype
    x_hat = x.to(compute) * r  # the normalised input, recomputed
    if grad_w is not None:
        grad_w += (grad * x_hat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0, dtype=compute)
    if grad_x is not None:
        # The gradient reaches the normalised input in the input's dtype (forward rounded it there).
        g = (grad * weight).to(x.dtype).to(compute)
        # d/dx of x * r with r = (mean(x^2) + eps)^-1/2: r * (g - x_hat * mean(g * x_hat)).
        dot = (g * x_hat).mean(-1, keepdim=True)
        grad_x.copy_(g.sub_(x_hat.mul_(dot)).mul_(r))


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
