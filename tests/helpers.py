"""Shared test utilities: configs, comparisons that say where they differ."""

from __future__ import annotations

import torch

from odysseus import TransformerConfig
from odysseus.reference import TransformerBlock, init_weights

# The odd shape every parity test includes: nothing divides evenly.
ODD = dict(hidden_size=96, num_heads=6, num_kv_heads=2, intermediate_size=160)
EVEN = dict(hidden_size=64, num_heads=8, num_kv_heads=4, intermediate_size=128)


def make_block(dtype=torch.float32, seed: int = 0, **cfg) -> TransformerBlock:
    """A reference block with N(0, 0.02)-ish weights and non-trivial norm weights."""
    config = TransformerConfig(**(cfg or ODD))
    g = torch.Generator().manual_seed(seed)
    block = init_weights(TransformerBlock(config), std=0.08, seed=seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "layernorm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return block.to(dtype)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str = "", scaled: bool = False
) -> None:
    """allclose that reports the worst element, its index and the error size.

    ``scaled=True`` makes ``atol`` relative to ``max |expected|``: right for sums with cancellation, where a
    small element carries an absolute error of the size of the large ones times epsilon.
    """
    actual, expected = actual.detach().double(), expected.detach().double()
    if scaled:
        atol = atol * expected.abs().max().item()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = err > bound
    if bad.any() or not torch.isfinite(actual).all():
        idx = tuple(int(i) for i in torch.nonzero(bad | ~torch.isfinite(actual))[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements differ; worst abs err {err.max().item():.3e} "
            f"(scale {expected.abs().max().item():.3e}); first at {idx}: {actual[idx].item()} vs {expected[idx].item()}"
        )


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|, in fp64."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


# --- the parity harness (odysseus.parity, shared with the demo) and one table of strategies x backends ----

from odysseus.parity import Run, relative_errors, run_parallel, run_reference  # noqa: E402
from odysseus.strategies.registry import SPECS  # noqa: E402

# Strategies whose activations go through the overlap ops run on each CPU backend; the others have no
# all-gather⊗GEMM to overlap, so "auto" is all they take. (symm on CPU: tests/test_symm.py, small shapes.)
CPU_OVERLAP_BACKENDS = ("naive", "pipelined")
STRATEGY_BACKENDS = [(s.name, b) for s in SPECS for b in (CPU_OVERLAP_BACKENDS if s.overlapped else ("auto",))]

__all__ = ["Run", "relative_errors", "run_parallel", "run_reference", "STRATEGY_BACKENDS"]


def assert_runs_close(ours: Run, want: Run, what: str, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Output, input gradient and every weight gradient of two runs agree (atol scaled by each tensor's max)."""
    tol = dict(rtol=rtol, atol=atol, scaled=True)
    assert_close(ours.output, want.output, **tol, what=f"{what} output")
    assert_close(ours.input_grad, want.input_grad, **tol, what=f"{what} x.grad")
    assert set(ours.grads) == set(want.grads), (sorted(ours.grads), sorted(want.grads))
    for k in want.grads:
        assert_close(ours.grads[k], want.grads[k], **tol, what=f"{what} {k}.grad")


def assert_low_precision_within(ours: Run, base: Run, truth: Run, what: str, factor: float = 3, slack: float = 0):
    """Every tensor of ``ours`` is within ``factor`` x the error of ``base`` (the reference in the same low
    precision), both measured against ``truth`` (the fp64 reference); returns the errors."""
    e_ours, e_base = relative_errors(ours, truth), relative_errors(base, truth)
    for k in e_base:
        assert e_ours[k] <= factor * e_base[k] + slack, (
            f"{what} {k}: error {e_ours[k]:.2e} vs reference {e_base[k]:.2e}"
        )
    return {k: (e_ours[k], e_base[k]) for k in e_base}
