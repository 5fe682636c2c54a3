"""The fused RMSNorm: the reference composition's values and gradients, keeping the input and one fp32 number
per token (the composition keeps an fp32 copy and the normalised input too); the fused SwiGLU's backward
holds two fp32 tensors of its width at a time."""

import pytest
import torch

from odysseus import layout
from odysseus.ops.rmsnorm import FusedRMSNorm, rms_norm
from odysseus.ops.swiglu import swiglu
from odysseus.reference import RMSNorm
from odysseus.training.memtrack import MemoryTracker


def _pair(dtype, weight_dtype, d=96):
    g = torch.Generator().manual_seed(0)
    ref, fused = RMSNorm(d, 1e-5), FusedRMSNorm(d, 1e-5)
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(weight_dtype)
    for m in (ref, fused):
        m.weight.data = w.clone()
    x = (3 * torch.randn(3, 61, d, generator=g)).to(dtype)
    dy = torch.randn(3, 61, d, generator=g).to(torch.promote_types(dtype, weight_dtype))
    return ref, fused, x, dy


def _grads(norm, x, dy):
    x = x.clone().requires_grad_()
    y = norm(x)
    y.backward(dy)
    return y, x.grad, norm.weight.grad


def test_fused_rmsnorm_gradcheck_in_fp64_numerics():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = (0.5 + torch.rand(7, dtype=torch.float64, generator=g)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-3), (x, w))


DTYPES = [
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),  # fp32 weights, 16-bit activations (autocast-style)
    (torch.float16, torch.float16),
]


@pytest.mark.parametrize("dtype, weight_dtype", DTYPES, ids=[f"{a}-{b}" for a, b in DTYPES])
def test_fused_rmsnorm_matches_the_reference_composition_numerics(dtype, weight_dtype):
    """Forward bit for bit; gradients to the rounding of the input's dtype (both round where forward did)."""
    ref, fused, x, dy = _pair(dtype, weight_dtype)
    y_ref, gx_ref, gw_ref = _grads(ref, x, dy)
    y, gx, gw = _grads(fused, x, dy)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    assert gx.dtype == dtype and gw.dtype == weight_dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    for what, a, b in (("input", gx, gx_ref), ("weight", gw, gw_ref)):
        err = ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
        assert err <= tol, f"{what} gradient {err:.2e} from the composition's ({dtype}, weight {weight_dtype})"


def _saved_bytes(norm, x):
    sizes = []

    def pack(t):
        sizes.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        norm(x.clone().requires_grad_())
    return sum(sizes)


def test_fused_rmsnorm_keeps_the_input_and_one_fp32_per_token():
    ref, fused, x, _ = _pair(torch.bfloat16, torch.bfloat16)
    tokens, d = 3 * 61, 96
    assert _saved_bytes(fused, x) == tokens * d * 2 + tokens * 4 + d * 2  # x, rsqrt, the weight
    assert _saved_bytes(ref, x) >= tokens * d * (4 + 4 + 2)  # fp32 x, fp32 x_hat, 16-bit x_hat


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_backward_holds_twelve_bytes_per_element(dtype):
    """Measured with the live-bytes tracker."""
    n = 64 * 97
    gate = torch.randn(n, dtype=dtype, requires_grad=True)
    up = torch.randn(n, dtype=dtype, requires_grad=True)
    y = swiglu(gate, up)
    dy = torch.randn(n, dtype=dtype)
    with MemoryTracker() as mem:
        y.backward(dy)
    # bf16: sigmoid and d_gate's fp32 accumulator, with the two 16-bit gradients; fp32: sigmoid and the two
    # gradients. A plain fp32 recomputation (upcast copies, silu, sigmoid, the terms) holds 32 bytes.
    assert mem.peak_bytes == 12 * n, (mem.peak_bytes / n, mem.peak_op)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10**6])
def test_fused_rmsnorm_backward_in_chunks_of_tokens_numerics(monkeypatch, chunk):
    """Chunked forward and backward (any chunk, batch 3 x 61 tokens, uneven last chunk): fp64 gradcheck, bf16
    values bit for bit and gradients equal to the composition's."""
    monkeypatch.setattr(layout, "RMSNORM_CHUNK_ROWS", chunk)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 61, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = (0.5 + torch.rand(5, dtype=torch.float64, generator=g)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-3), (x, w))
    ref, fused, xb, dy = _pair(torch.bfloat16, torch.float32)
    (y_ref, gx_ref, gw_ref), (y, gx, gw) = _grads(ref, xb, dy), _grads(fused, xb, dy)
    assert torch.equal(y, y_ref)  # forward in chunks: still the composition's values bit for bit
    for a, b in ((gx, gx_ref), (gw, gw_ref)):
        assert ((a.double() - b.double()).abs().max() / b.double().abs().max()).item() <= 1e-2


def test_fused_rmsnorm_backward_gradient_through_a_strided_view_numerics(monkeypatch):
    """A sequence-major gradient (what the overlap ops return) is sliced, not copied, and gives the same grads."""
    monkeypatch.setattr(layout, "RMSNORM_CHUNK_ROWS", 20)
    _, fused, x, dy = _pair(torch.float32, torch.float32)
    strided = dy.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    (_, gx, gw), (_, gx_s, gw_s) = _grads(fused, x, dy), _grads(fused, x, strided)
    assert torch.allclose(gx, gx_s, rtol=1e-6, atol=1e-7) and torch.allclose(gw, gw_s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [16, 10**6])
def test_fused_rmsnorm_backward_peak_is_the_plans_form(monkeypatch, chunk):
    """Measured with the live-bytes tracker against odysseus.plan.memory.norm_backward_bytes: the input
    gradient, the fp32 weight gradient and one chunk's three fp32 tensors and per-token mean."""
    import odysseus
    from odysseus.plan import Case
    from odysseus.plan.memory import norm_backward_bytes

    monkeypatch.setattr(layout, "RMSNORM_CHUNK_ROWS", chunk)
    B, T, d = 2, 61, 96
    x = torch.randn(B, T, d, dtype=torch.bfloat16, requires_grad=True)
    norm = FusedRMSNorm(d).to(torch.bfloat16)
    y = norm(x)
    dy = torch.randn_like(y)
    with MemoryTracker() as mem:
        y.backward(dy)
    cfg = odysseus.TransformerConfig(hidden_size=d, num_heads=6, num_kv_heads=2, intermediate_size=160)
    form = norm_backward_bytes(Case("tp", cfg, B, T, 1, 0, 2))
    made = d * 2  # the weight's bf16 gradient, made at the end while the fp32 sum lives
    assert mem.peak_bytes == max(form, B * T * d * 2 + d * 4 + made), (mem.peak_bytes, form, mem.peak_op)
    if chunk == 16:
        assert mem.peak_bytes < 3 * 4 * B * T * d  # below one whole fp32 pass over the input


def test_fused_rmsnorm_forward_holds_one_chunk_of_fp32(monkeypatch):
    """Forward allocates its output and the fp32 rsqrt, and fp32 temporaries of one chunk only: a whole-input
    fp32 pass (the composition's upcast, 4 bytes per element) is more than it ever adds."""
    monkeypatch.setattr(layout, "RMSNORM_CHUNK_ROWS", 16)
    B, T, d = 2, 61, 96
    x = torch.randn(B, T, d, dtype=torch.bfloat16)
    norm = FusedRMSNorm(d).to(torch.bfloat16)
    with torch.no_grad(), MemoryTracker() as mem:
        y = norm(x)
    out, rsqrt = B * T * d * 2, B * T * 4
    chunk_fp32 = 3 * 4 * 16 * d  # the upcast, its square, the normalised input (16 rows = 8 tokens x 2)
    assert out + rsqrt <= mem.peak_bytes <= out + rsqrt + chunk_fp32, mem.peak_bytes
    assert mem.peak_bytes < out + B * T * d * 4 and y.shape == x.shape
