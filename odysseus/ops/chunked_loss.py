"""Cross-entropy of a linear head without the full logits: the LM head and the loss, a chunk of tokens at a time.

At long sequences the logits dominate what is left after recomputation: ``tokens x vocab`` in fp32 is 67 GB
per rank for Llama-3-8B at 1M tokens over 8 ranks. :func:`linear_cross_entropy` keeps ``chunk x vocab`` of
them at a time, in forward and (recomputed) in backward, and keeps nothing but its inputs in between.

Two implementations, the same numbers:

- ``"chunked"`` (everywhere): a custom autograd function. Forward sums the chunks' losses; backward
  recomputes each chunk's logits and writes the gradients in place, so no ``(tokens, vocab)`` tensor exists.
- ``"liger"``: Liger-Kernel's fused linear cross-entropy (``pip install liger-kernel``), Triton kernels that
  also fuse the softmax; ``"auto"`` picks it for CUDA tensors when it is installed.

Precision follows Hugging Face's loss: the head's matmul in the inputs' dtype (the autocast dtype under
``torch.autocast``), the softmax and the loss in fp32.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

__all__ = ["IMPLS", "linear_cross_entropy", "resolve_impl"]

IMPLS = ("auto", "chunked", "liger")


def resolve_impl(impl: str, device: torch.device) -> str:
    """``"chunked"`` or ``"liger"``: what ``impl`` means for tensors on ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
    has_liger = importlib.util.find_spec("liger_kernel") is not None
    if impl == "liger" and not has_liger:
        raise ValueError("impl='liger' needs Liger-Kernel (pip install liger-kernel); use impl='chunked'")
    if impl == "auto":
        return "liger" if has_liger and device.type == "cuda" else "chunked"
    return impl


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # The dtype the head's matmul would run in: torch.autocast's, when it is on for this device.
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    """``h: (n, hidden)`` -> fp32 ``(n, vocab)`` logits, the matmul in ``dtype``."""
    b = None if bias is None else bias.to(dtype)
    return F.linear(h.to(dtype), weight.to(dtype), b).float()


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, ignore_index: int, dtype: torch.dtype):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                logits = _chunk_logits(hidden[s : s + chunk], weight, bias, dtype)
                total += F.cross_entropy(logits, targets[s : s + chunk], ignore_index=ignore_index, reduction="sum")
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk, ctx.ignore_index, ctx.dtype = chunk, ignore_index, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Summed over chunks in fp32, then rounded once, as one matmul over all tokens would.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        w = weight.to(ctx.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], ctx.chunk):
                h, t = hidden[s : s + ctx.chunk], targets[s : s + ctx.chunk]
                # d loss / d logits = softmax - onehot(target), zero on ignored tokens, times the incoming grad.
                d = torch.softmax(_chunk_logits(h, weight, bias, ctx.dtype), dim=-1)
                keep = t != ctx.ignore_index
                rows = keep.nonzero().squeeze(1)
                d[rows, t[rows]] -= 1
                d[~keep] = 0
                d = (d * grad_total).to(ctx.dtype)
                if need_h:
                    grad_h[s : s + ctx.chunk] = d @ w
                if need_w:
                    grad_w += (d.t() @ h.to(ctx.dtype)).float()
                if need_b:
                    grad_b += d.float().sum(0)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return cast(grad_h, hidden), cast(grad_w, weight), cast(grad_b, bias), None, None, None, None


def _liger(hidden, weight, bias, targets, ignore_index, dtype):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    b = None if bias is None else bias.to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        total = liger_fused_linear_cross_entropy(
            hidden.to(dtype), weight.to(dtype), targets, b, ignore_index=ignore_index, reduction="sum"
        )
    return total.float()


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk: int = 4096,
    ignore_index: int = -100,
    impl: str = "auto",
) -> torch.Tensor:
    """``sum over tokens of cross_entropy(hidden @ weight.T + bias, targets)``, an fp32 scalar.

    ``hidden: (..., hidden)``, ``weight: (vocab, hidden)``, ``bias: (vocab,)`` or None, ``targets: (...)``
    integer class indices, ``ignore_index`` where a token has no loss. ``chunk``: tokens whose logits exist
    at once (``"chunked"``; Liger picks its own). Gradients reach ``hidden``, ``weight`` and ``bias``.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden of shape {tuple(hidden.shape)} and targets of shape {tuple(targets.shape)}: expected "
            "targets with hidden's shape less its last dimension"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight of shape {tuple(weight.shape)}; expected (vocab, {hidden.shape[-1]})")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias of shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets of dtype {targets.dtype}; expected integer class indices")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r}; expected a positive number of tokens")
    devices = {t.device for t in (hidden, weight, targets, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"hidden, weight, targets and bias are on {sorted(map(str, devices))}; expected one device")
    dtype = _compute_dtype(hidden)
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if resolve_impl(impl, hidden.device) == "liger":
        return _liger(h, weight, bias, t, ignore_index, dtype)
    return _ChunkedLinearCE.apply(h, weight, bias, t, chunk, ignore_index, dtype)
