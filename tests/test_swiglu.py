"""The fused SwiGLU: the same values and gradients as autograd's silu(gate) * up, keeping two tensors, not three."""

import torch

from odysseus.ops.swiglu import swiglu


def test_swiglu_gradients_match_autograd_in_fp64_numerics():
    g = torch.Generator().manual_seed(0)
    gate = (3 * torch.randn(7, 61, 40, generator=g, dtype=torch.float64)).requires_grad_()
    up = torch.randn(7, 61, 40, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        swiglu, (gate[:2, :3, :4].detach().requires_grad_(), up[:2, :3, :4].detach().requires_grad_())
    )
    grad = torch.randn(7, 61, 40, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(swiglu(gate, up), (gate, up), grad)
    want = torch.autograd.grad(torch.nn.functional.silu(gate) * up, (gate, up), grad)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_swiglu_bf16_no_less_accurate_than_autograd_numerics():
    g = torch.Generator().manual_seed(1)
    gate64, up64 = (
        3 * torch.randn(4096, generator=g, dtype=torch.float64),
        torch.randn(4096, generator=g, dtype=torch.float64),
    )
    grad64 = torch.randn(4096, generator=g, dtype=torch.float64)
    truth = torch.autograd.grad(
        torch.nn.functional.silu(gate64.requires_grad_()) * up64.requires_grad_(), (gate64, up64), grad64
    )

    def grads(fn):
        gate, up = gate64.detach().bfloat16().requires_grad_(), up64.detach().bfloat16().requires_grad_()
        return torch.autograd.grad(fn(gate, up), (gate, up), grad64.bfloat16())

    ours = grads(swiglu)
    base = grads(lambda a, b: torch.nn.functional.silu(a) * b)
    for o, b, t in zip(ours, base, truth):
        assert (o.double() - t).abs().max() <= (b.double() - t).abs().max()


def test_swiglu_keeps_gate_and_up_only():
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t

    gate, up = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swiglu(gate, up).sum().backward()
    assert sorted(saved) == sorted([gate.untyped_storage().data_ptr(), up.untyped_storage().data_ptr()])
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        (torch.nn.functional.silu(gate) * up).sum()
    assert len(set(saved)) == 3  # autograd's composition also keeps silu(gate)
