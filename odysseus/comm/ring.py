"""Ring attention over the ``ring`` dim of a mesh: K/V blocks pass around by point-to-point transfers.

Forward: R steps; at each, this rank starts sending the K/V block it holds to the next ring rank (and
receiving the previous rank's), attends its queries to the block it holds meanwhile, and merges the result by
log-sum-exp (:mod:`odysseus.ops.ring_attention`): R-1 hops. Backward runs the ring again (R-1 K/V hops) and
passes a dK/dV buffer along with each block: every rank adds its share to the buffer of the block it holds,
so after R hops the buffer arrives home holding the block's whole gradient. Buffers travel in K/V's dtype.
kv heads travel unexpanded (GQA). Every hop is recorded in the CommLedger as ``send_recv`` with its bytes
(``B * T * h_kv * head_dim * 2 * itemsize``, T the tokens of the block sent) under mesh dim ``ring``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..ops.ring_attention import block_backward, block_forward, merge, plan_block
from . import ledger
from .failures import named_failures
from .groups import group_rank, group_size


@dataclass(frozen=True, eq=False)
class RingPlan:
    """What every ring rank's queries and keys are: ``tokens[j]`` the global indices (CPU, ascending) of ring rank
    j's tokens, ``documents[j]`` their document ids ``(B or 1, T_j)`` (None: one document per row)."""

    pg: dist.ProcessGroup
    tokens: list[torch.Tensor]
    documents: list[torch.Tensor] | None
    causal: bool
    scale: float
    kv_of_q: torch.Tensor | None
    label: str = "attn.ring"

    def block(self, me: int, src: int, device):
        docs = self.documents
        return plan_block(self.tokens[me], self.tokens[src], self.causal, docs and docs[me], docs and docs[src], device)


class _Hop:
    """One transfer in flight: ``buf`` to the next ring rank, a block of ``shape`` from the previous one."""

    def __init__(self, buf: torch.Tensor, shape, pg, label: str):
        R, me = group_size(pg), group_rank(pg)
        self.recv, self.label = buf.new_empty(shape), label
        ops = [
            dist.P2POp(dist.isend, buf, dist.get_global_rank(pg, (me + 1) % R), pg),
            dist.P2POp(dist.irecv, self.recv, dist.get_global_rank(pg, (me - 1) % R), pg),
        ]
        with named_failures(f"ring send/recv {label}"):
            self.works = dist.batch_isend_irecv(ops)
        ledger.record("send_recv", buf.nbytes, self.recv.nbytes, R, "activation", label, pg)

    def wait(self) -> torch.Tensor:
        with named_failures(f"ring send/recv {self.label}"):
            for w in self.works:
                w.wait()
        return self.recv


def _kv_shape(k: torch.Tensor, tokens: int) -> tuple[int, ...]:
    return (2, k.shape[0], tokens, *k.shape[2:])


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan):
        pg = plan.pg
        R, me = group_size(pg), group_rank(pg)
        B, T, H, D = q.shape
        kv = torch.stack([k, v])
        out = q.new_zeros(B, T, H, D, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        lse = out.new_full((B, H, T), float("-inf"))
        for step in range(R):
            src = (me - step) % R
            hop = None
            if step < R - 1:  # the next block is on its way while this one is attended to
                hop = _Hop(kv, _kv_shape(k, len(plan.tokens[(src - 1) % R])), pg, f"{plan.label}.kv")
            blk = plan.block(me, src, q.device)
            if not blk.empty:
                lo, hi = blk.q_lo, blk.k_hi
                o, s = block_forward(q[:, lo:], kv[0][:, :hi], kv[1][:, :hi], blk.mask, plan.scale, plan.kv_of_q)
                out[:, lo:], lse[..., lo:] = merge(out[:, lo:], lse[..., lo:], o, s)
            if hop is not None:
                kv = hop.wait()
        out = out.to(q.dtype)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        plan = ctx.plan
        q, k, v, out, lse = ctx.saved_tensors
        pg = plan.pg
        R, me = group_size(pg), group_rank(pg)
        dq = torch.zeros_like(q, dtype=lse.dtype)
        kv, dkv = torch.stack([k, v]), torch.zeros(_kv_shape(k, k.shape[1]), dtype=k.dtype, device=k.device)
        travelling = None  # the dK/dV buffer of the block this rank holds, on its way here
        for step in range(R):
            src = (me - step) % R
            hop = None
            if step < R - 1:
                hop = _Hop(kv, _kv_shape(k, len(plan.tokens[(src - 1) % R])), pg, f"{plan.label}.kv")
            blk = plan.block(me, src, q.device)
            grads = None
            if not blk.empty:
                lo, hi = blk.q_lo, blk.k_hi
                grads = block_backward(
                    dout[:, lo:], q[:, lo:], kv[0][:, :hi], kv[1][:, :hi], out[:, lo:], lse[..., lo:],
                    blk.mask, plan.scale, plan.kv_of_q,
                )  # fmt: skip
                dq[:, lo:] += grads[0]
            if travelling is not None:
                dkv = travelling.wait()
            if grads is not None:
                dkv[:, :, :hi] = (dkv[:, :, :hi].to(dq.dtype) + torch.stack(grads[1:])).to(dkv.dtype)
            if R > 1:  # on to the next rank; after R hops each buffer is home
                travelling = _Hop(dkv, _kv_shape(k, len(plan.tokens[(src - 1) % R])), pg, f"{plan.label}.dkv")
            if hop is not None:
                kv = hop.wait()
        if travelling is not None:
            dkv = travelling.wait()
        return dq.to(q.dtype), dkv[0], dkv[1], None


@torch.compiler.disable  # point-to-point transfers in a host-driven loop: run eagerly, one graph break
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> torch.Tensor:
    """Attention of this ring rank's ``q: (B, T, Hq, D)`` over the keys of every ring rank, ``k, v: (B, T, Hkv, D)``
    this rank's (unexpanded) -> ``(B, T, Hq, D)``; collective over ``plan.pg``."""
    return _RingAttention.apply(q, k.contiguous(), v.contiguous(), plan)
