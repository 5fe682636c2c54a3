"""A whole Llama block split by one strategy: the registry's attention and FFN between replicated norms."""

from __future__ import annotations

import torch
from torch import nn

from .. import reference
from ..comm.verdict import attempt
from ..ops.recompute import recompute
from ..ops.rmsnorm import FusedRMSNorm
from ..validation import check_input
from . import registry
from .module import ParamSpec, deepcopy_sharing_group, track, trainable


class ParallelBlock(nn.Module):
    """A Llama block split by ``strategy``: ``h = x + attn(norm(x))``, ``y = h + ffn(norm(h))``.

    ``forward(x, position_ids=None)``: for ``"tp"`` ``x: (batch, seq, hidden)`` on every rank; for the
    sequence-split strategies ``x: (batch, seq_local, hidden)`` from :func:`odysseus.shard_sequence`.
    The output has the input's layout. The norms are replicated; where the sequence is split they see only
    this rank's tokens, so their gradients are summed by :func:`odysseus.finalize_grads`.

    ``weights``: a dense block's state dict to take this rank's share of (default: fresh weights, see
    :class:`~odysseus.strategies.module.ParallelModule`); other keyword arguments (``backend``, ``seed``,
    ``check_finite``, ``save_input``, ``ffn_tile``, ``device``, ``dtype``...) go to the attention and FFN modules.
    ``checkpoint=True``: the block keeps only its input for backward and recomputes the rest
    (:func:`odysseus.ops.recompute.recompute`; collectives re-run there are recorded under the ``"recompute"``
    phase); ``offload=True`` also moves that input to host memory (pinned on CUDA) until backward.
    :meth:`from_dense` takes the share of a reference block (``parallelize`` calls it).
    """

    def __init__(
        self,
        config,
        strategy: str,
        group=None,
        *,
        weights: dict | None = None,
        checkpoint: bool = False,
        offload: bool = False,
        **kwargs,
    ):
        super().__init__()
        if offload and not checkpoint:
            raise ValueError("offload=True offloads the inputs a checkpointed block keeps: it needs checkpoint=True")
        self.checkpoint, self.offload = checkpoint, offload
        self.spec = registry.get(strategy)
        self.config, self.strategy = config, strategy
        attn_cls, ffn_cls = self.spec.modules()
        weights = weights or {}

        def sub(prefix: str) -> dict | None:
            got = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
            return got or None

        self.input_layernorm = FusedRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attn_cls(config, group, weights=sub("self_attn."), **kwargs)
        self.post_attention_layernorm = FusedRMSNorm(config.hidden_size, config.rms_norm_eps)
        # The default input check looks at the block's input only: the attention's exchange carries it.
        ffn_kwargs = {**kwargs, "check_inputs": kwargs.get("check_inputs") or False}
        self.mlp = ffn_cls(config, group, weights=sub("mlp."), **ffn_kwargs)
        like = self.self_attn.q_proj.weight
        sync = "sum" if self.spec.sequence_split and self.self_attn.world > 1 else "none"
        self.param_specs: dict[str, ParamSpec] = {}
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(self, name).to(like.device, like.dtype)
            if f"{name}.weight" in weights:
                with torch.no_grad():
                    norm.weight.copy_(weights[f"{name}.weight"])
                norm.weight.requires_grad_(trainable(weights[f"{name}.weight"]))  # frozen stays frozen
            self.param_specs[f"{name}.weight"] = ParamSpec(sync=sync)
        self.pg, self.mesh = self.self_attn.pg, self.self_attn.mesh
        self.who = f"ParallelBlock[{strategy}]"
        track(self)

    def __deepcopy__(self, memo: dict) -> ParallelBlock:
        """A copy with its own weights on the same process group (an EMA model, say)."""
        return deepcopy_sharing_group(self, memo)

    @classmethod
    def from_dense(cls, block: reference.TransformerBlock, strategy: str, group=None, **kwargs) -> ParallelBlock:
        """This rank's share of ``block``, on the block's device and in its dtype."""
        return cls(block.config, strategy, group, weights=dict(block.state_dict(keep_vars=True)), **kwargs)

    @property
    def sequence_split(self) -> bool:
        """Whether this block takes ``shard_sequence`` shards (else the full sequence on every rank)."""
        return self.spec.sequence_split

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        _, error = attempt(lambda: check_input(x, self.input_layernorm.weight, self.config.hidden_size, self.who))
        if error is not None:
            # Its attention runs the same check (against q_proj, on the norm's device and dtype) inside its
            # length exchange, so the failure raises on every rank instead of leaving the others waiting there.
            self.self_attn(x, position_ids)
            raise error
        if self.checkpoint:
            return recompute(self._block, x, position_ids, offload=self.offload)
        return self._block(x, position_ids)

    def _block(self, x: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), position_ids)
        return h + self.mlp(self.post_attention_layernorm(h))

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, checkpoint={self.checkpoint}, offload={self.offload}"
