"""Attention throughput as a fraction of the dense peak, by sequence length and head dim, from published figures.

Source: Shah, Bikshandi, Zhang, Thakkar, Ramani, Dao, "FlashAttention-3: Fast and Accurate Attention with
Asynchrony and Low-precision", arXiv:2407.08608 (2024), the FP16/BF16 speed figures on H100 80GB SXM5
("Attention forward speed, head dim 64/128", with causal mask; "Attention backward speed, head dim 64/128"),
which plot FlashAttention-2 (the kernel of torch's SDPA flash backend and of flash-attn 2) beside
FlashAttention-3 at sequence lengths 512 to 16k (batch x seqlen = 16k, hidden 2048). The numbers below are
the TFLOPs/s printed above the bars, as read from the figures (through a transcription of the figure
images; not from a table in the paper's text). Two labels read differently between transcriptions and
were taken as below: FlashAttention-2 forward without mask, hd 128, at 16k (370, against 395) and
FlashAttention-3's bar at 512 of the same panel (467, against 497). The backward figures' titles name no
mask: they are applied to every backward kernel, causal or not.

The FlashAttention-2 paper's A100 figures (Dao 2023, arXiv:2307.08691, "Attention forward + backward speed
on A100") could not be read here: hardware without a curve (A100, a calibration) keeps the constant
``Assumptions.attention_efficiency``. Beyond 16k the figures stop and every curve has flattened (under 2%
from 8k to 16k): the 16k value is held. Between points the efficiency is interpolated linearly in
log2(seq); head dims between 64 and 128 linearly, outside them the nearest.
"""

from __future__ import annotations

import math

from .presets import Assumptions, Hardware

SEQ = (512, 1024, 2048, 4096, 8192, 16384)
"""The sequence lengths of the figures."""

H100_PEAK_TFLOPS = 989.0
"""The dense bf16 peak the fractions are taken against (the H100 SXM datasheet; ``HARDWARE['h100-nvlink']``)."""

# (kernel, phase, causal, head_dim) -> TFLOPs/s at SEQ, read from arXiv:2407.08608's figures on H100 SXM5.
# Forward: the causal panels. Backward: the backward panels (one per head dim).
# Forward without the mask (hd 64 / 128), for the full blocks of a ring's later steps.
TFLOPS = {
    ("fa2", "forward", True, 64): (180, 229, 262, 284, 295, 299),
    ("fa2", "forward", True, 128): (191, 260, 298, 319, 333, 335),
    ("fa2", "forward", False, 64): (282, 306, 318, 321, 322, 324),
    ("fa2", "forward", False, 128): (309, 350, 362, 368, 370, 370),
    ("fa2", "backward", None, 64): (198, 238, 264, 279, 287, 291),
    ("fa2", "backward", None, 128): (214, 260, 291, 310, 318, 322),
    ("fa3", "forward", True, 64): (197, 265, 371, 420, 460, 473),
    ("fa3", "forward", True, 128): (292, 423, 521, 579, 602, 616),
    ("fa3", "forward", False, 64): (333, 392, 460, 476, 496, 497),
    ("fa3", "forward", False, 128): (467, 565, 625, 638, 646, 648),
    ("fa3", "backward", None, 64): (272, 363, 422, 453, 472, 474),
    ("fa3", "backward", None, 128): (316, 424, 501, 542, 559, 561),
}
KERNELS = ("fa2", "fa3")


def has_curve(hw: Hardware) -> bool:
    """The figures were measured on H100: the curve applies to the H100 presets (as a fraction of the peak)."""
    return hw.name.startswith("h100")


def _along_seq(points: tuple[int, ...], seq: float) -> float:
    x = math.log2(min(max(seq, SEQ[0]), SEQ[-1]))
    for k in range(len(SEQ) - 1):
        lo, hi = math.log2(SEQ[k]), math.log2(SEQ[k + 1])
        if x <= hi:
            return points[k] + (points[k + 1] - points[k]) * (x - lo) / (hi - lo)
    return float(points[-1])


def figure_tflops(kernel: str, phase: str, causal: bool, seq: float, head_dim: int) -> float:
    """TFLOPs/s the figures give ``kernel`` (``"fa2"``/``"fa3"``) in ``phase`` (``"forward"``/``"backward"``) at
    ``seq`` tokens and ``head_dim``, interpolated (see the module docstring)."""
    if kernel not in KERNELS or phase not in ("forward", "backward"):
        raise ValueError(f"kernel={kernel!r}, phase={phase!r}; expected one of {KERNELS} and forward/backward")
    if seq < 1 or head_dim < 1:
        raise ValueError(f"seq={seq!r} and head_dim={head_dim!r} must be positive")
    mask = causal if phase == "forward" else None
    lo, hi = (_along_seq(TFLOPS[(kernel, phase, mask, h)], seq) for h in (64, 128))
    t = min(max((head_dim - 64) / 64, 0.0), 1.0)
    return lo + (hi - lo) * t


def attention_efficiency(
    hw: Hardware, a: Assumptions, seq: float, head_dim: int, phase: str, causal: bool = True
) -> float:
    """Fraction of ``hw.peak_flops`` one attention kernel call reaches over ``seq`` query (and key) tokens:
    the figures' curve on H100 (``a.attention_kernel``), else the constant ``a.attention_efficiency``."""
    if not has_curve(hw):
        return a.attention_efficiency
    return figure_tflops(a.attention_kernel, phase, causal, seq, head_dim) / H100_PEAK_TFLOPS
