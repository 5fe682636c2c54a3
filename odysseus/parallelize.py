"""One entry point over the four strategies, plus checkpoint and gradient helpers.

``parallelize(module, strategy, group)`` turns a reference ``TransformerBlock``, ``Attention`` or
``FFN`` into this rank's share; ``dense_state_dict`` reassembles the dense tensors (or gradients);
``finalize_grads`` sums the partial gradients of replicated weights; ``zero3`` shards those weights
with FSDP2 instead.
"""

from __future__ import annotations

import torch
from torch import nn

from . import reference
from .comm import primitives
from .comm.groups import group_rank, group_size, resolve_group
from .comm.ledger import phase
from .overlap import check_backend, check_overlap
from .strategies.common import ParallelModule, ParamSpec
from .strategies.odysseus import OdysseusAttention, SeqParallelFFN
from .strategies.tp import TPFFN, TPAttention
from .strategies.tp_sp import TPSPFFN, TPSPAttention
from .strategies.ulysses import UlyssesAttention
from .validation import check_input

STRATEGIES = ("tp", "tp-sp", "ulysses", "odysseus")

_MODULES = {
    "tp": (TPAttention, TPFFN),
    "tp-sp": (TPSPAttention, TPSPFFN),
    "ulysses": (UlyssesAttention, SeqParallelFFN),
    "odysseus": (OdysseusAttention, SeqParallelFFN),
}


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    return strategy


class ParallelBlock(nn.Module):
    """A Llama block split by ``strategy``: ``h = x + attn(norm(x))``, ``y = h + ffn(norm(h))``.

    ``forward(x, position_ids=None)``: for ``"tp"`` ``x: (batch, seq, hidden)`` on every rank; for the
    sequence-split strategies ``x: (batch, seq_local, hidden)`` from :func:`odysseus.shard_sequence`.
    The output has the input's layout. The norms are replicated; outside TP they see only this rank's
    tokens, so their gradients are summed by :func:`finalize_grads`.

    ``weights``: a dense block's state dict to take this rank's share of (default: fresh weights, see
    :class:`~odysseus.strategies.common.ParallelModule`); other keyword arguments (``backend``, ``seed``,
    ``check_finite``, ``device``, ``dtype``...) go to the attention and FFN modules.
    """

    def __init__(self, config, strategy: str, group=None, *, weights: dict | None = None, **kwargs):
        super().__init__()
        self.config, self.strategy = config, check_strategy(strategy)
        attn_cls, ffn_cls = _MODULES[strategy]
        weights = weights or {}

        def sub(prefix: str) -> dict | None:
            got = {k[len(prefix) : -len(".weight")]: v for k, v in weights.items() if k.startswith(prefix)}
            return got or None

        self.input_layernorm = reference.RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attn_cls(config, group, weights=sub("self_attn."), **kwargs)
        self.post_attention_layernorm = reference.RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = ffn_cls(config, group, weights=sub("mlp."), **kwargs)
        like = self.self_attn.q_proj.weight
        sync = "none" if strategy == "tp" or self.self_attn.world == 1 else "sum"
        self.param_specs: dict[str, ParamSpec] = {}
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(self, name).to(like.device, like.dtype)
            if f"{name}.weight" in weights:
                with torch.no_grad():
                    norm.weight.copy_(weights[f"{name}.weight"])
            self.param_specs[f"{name}.weight"] = ParamSpec(sync=sync)
        self.pg = self.self_attn.pg

    @classmethod
    def from_dense(cls, block: reference.TransformerBlock, strategy: str, group=None, **kwargs) -> ParallelBlock:
        """This rank's share of ``block``, on the block's device and in its dtype."""
        return cls(block.config, strategy, group, weights=dict(block.state_dict()), **kwargs)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x, self.input_layernorm.weight, self.config.hidden_size, f"ParallelBlock[{self.strategy}]")
        h = x + self.self_attn(self.input_layernorm(x), position_ids)
        return h + self.mlp(self.post_attention_layernorm(h))

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}"


def parallelize(
    module: nn.Module, strategy: str, group=None, *, backend: str = "auto", check_finite: bool = False
) -> nn.Module:
    """This rank's share of a reference ``TransformerBlock``, ``Attention`` or ``FFN`` under ``strategy``.

    ``group``: a ProcessGroup, a 1-D DeviceMesh, or None for the default group. ``backend`` picks how
    all-gather/reduce-scatter overlap with the GEMMs in TP-SP and Odysseus (see :mod:`odysseus.overlap`);
    ``check_finite=True`` rejects inputs holding NaN or Inf.
    For ``"tp"`` every rank is fed the full sequence; for the others its :func:`shard_sequence` shard.
    """
    check_strategy(strategy)
    check_backend(backend)
    resolve_group(group)
    attn_cls, ffn_cls = _MODULES[strategy]
    kwargs = dict(backend=backend, check_finite=check_finite)
    if isinstance(module, reference.TransformerBlock):
        return ParallelBlock.from_dense(module, strategy, group, **kwargs)
    if isinstance(module, reference.Attention):
        return attn_cls.from_dense(module, group, **kwargs)
    if isinstance(module, reference.FFN):
        return ffn_cls.from_dense(module, group, **kwargs)
    if isinstance(module, (ParallelModule, ParallelBlock)):
        raise TypeError(
            f"{type(module).__name__} is already parallelized (strategy {module.strategy!r}); "
            "parallelize the reference module instead"
        )
    raise TypeError(
        f"cannot parallelize a {type(module).__name__}; expected odysseus.reference.TransformerBlock, "
        "Attention or FFN (for Hugging Face models use odysseus.integrations.hf.parallelize_llama)"
    )


def _specs(module: nn.Module) -> dict[str, tuple[ParamSpec, object]]:
    """Full parameter name -> (spec, process group), for every parameter of ``module`` that has a spec."""
    out = {}
    for prefix, m in module.named_modules():
        for name, spec in getattr(m, "param_specs", {}).items():
            out[f"{prefix}.{name}" if prefix else name] = (spec, m.pg)
    return out


def _is_dtensor(t) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def _dense_shape(t: torch.Tensor, spec: ParamSpec) -> list[int]:
    shape = list(t.shape)
    if spec.dim is not None:
        shape[spec.dim] = max(e for _, e in spec.ranges)
    return shape


def _assemble(t: torch.Tensor, spec: ParamSpec, pg, label: str) -> torch.Tensor:
    """Gather every rank's slice of a split parameter into the dense tensor."""
    sizes = [e - s for s, e in spec.ranges]
    parts = primitives.all_gather(t.contiguous(), sizes, pg, spec.dim, category="weight", label=label)
    if all(spec.ranges[j][1] == spec.ranges[j + 1][0] for j in range(len(sizes) - 1)):
        return parts
    dense = t.new_empty(_dense_shape(t, spec))
    for (s, e), part in zip(spec.ranges, parts.split(sizes, dim=spec.dim)):
        dense.narrow(spec.dim, s, e - s).copy_(part)  # overlapping copies hold equal values
    return dense


def dense_state_dict(module: nn.Module, grad: bool = False) -> dict[str, torch.Tensor]:
    """Dense tensors under the reference module's keys, identical on every rank (collective: call on all).

    ``grad=True`` returns the gradients instead; call :func:`finalize_grads` first so replicated and
    shared weights hold their complete gradients. FSDP2-sharded weights are gathered too.
    """
    specs = _specs(module)
    out = {}
    for name, p in module.named_parameters():
        t = p.grad if grad else p.detach()
        if t is None:
            raise RuntimeError(f"{name} has no gradient; run backward() (and finalize_grads) first")
        if _is_dtensor(t):
            t = t.full_tensor()
        spec, pg = specs.get(name, (ParamSpec(), None))
        if spec.dim is not None and group_size(pg) > 1:
            t = _assemble(t, spec, pg, name)
        out[name] = t.detach().clone()
    return out


def finalize_grads(module: nn.Module) -> None:
    """Sum the partial gradients of replicated (and GQA-shared) weights over their group, in place.

    A split weight whose rows live on several ranks (a kv head shared by query heads of two ranks) is
    summed through a zero-padded dense buffer. One all-reduce per (group, dtype, device) bucket; a no-op
    where nothing needs syncing. FSDP2-managed weights are skipped: its reduce-scatter sums them.
    Collective: call on every rank. Also the once-per-step check of the symm kernels' waits
    (:func:`odysseus.check_overlap`), which raises ``TimeoutError`` if one gave up this step.
    """
    check_overlap()
    specs = _specs(module)
    buckets: dict[tuple, list] = {}
    for name, p in module.named_parameters():
        spec, pg = specs.get(name, (ParamSpec(), None))
        if spec.sync != "sum" or group_size(pg) == 1 or _is_dtensor(p):
            continue
        buckets.setdefault((pg, p.dtype, p.device), []).append((p, spec, group_rank(pg)))
    for (pg, _, _), params in buckets.items():
        dense = []
        for p, spec, rank in params:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if spec.dim is not None:
                s, e = spec.ranges[rank]
                padded = g.new_zeros(_dense_shape(g, spec))
                padded.narrow(spec.dim, s, e - s).copy_(g)
                g = padded
            dense.append(g)
        with phase("backward"):
            flat = primitives.all_reduce(
                torch.cat([g.reshape(-1) for g in dense]), pg, category="gradient", label="grads"
            )
        for (p, spec, rank), g, summed in zip(params, dense, flat.split([g.numel() for g in dense])):
            summed = summed.view(g.shape)
            if spec.dim is not None:
                s, e = spec.ranges[rank]
                summed = summed.narrow(spec.dim, s, e - s)
            p.grad = summed.clone()


def zero3(module: nn.Module, **fsdp_kwargs) -> nn.Module:
    """Shard the replicated weights of a parallel module with FSDP2 ``fully_shard`` (ZeRO-3), in place.

    Sharded on the module's own group: "Odysseus+ZeRO3" shards the FFN and norms, "Ulysses+ZeRO3" every
    weight, TP-SP its norms. FSDP2 averages gradients by default; this sets its divide factor to 1 to keep
    the sum-of-local-losses convention, so gradients still equal the reference's. Weights are resharded
    after forward by default (each sharded module is its own FSDP root, whose default would keep them
    gathered until backward and lose ZeRO-3's memory saving). Returns ``module``.
    """
    fsdp_kwargs.setdefault("reshard_after_forward", True)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    targets: dict[str, tuple[nn.Module, object]] = {}  # name -> (module to shard, its group)
    for prefix, m in module.named_modules():
        specs = getattr(m, "param_specs", {})
        replicated = [n for n, s in specs.items() if s.dim is None and s.sync == "sum"]
        if not replicated:
            continue
        if len(replicated) == len(list(m.parameters())):
            targets[prefix] = (m, m.pg)
            continue
        for name in replicated:
            owner = name.rsplit(".", 1)[0]
            targets[f"{prefix}.{owner}" if prefix else owner] = (m.get_submodule(owner), m.pg)
    # Shard inner modules before outer ones, as fully_shard expects.
    for _, (m, pg) in sorted(targets.items(), key=lambda kv: -kv[0].count(".")):
        device_type = next(m.parameters()).device.type
        fully_shard(m, mesh=DeviceMesh.from_group(pg, device_type), **fsdp_kwargs)
        set_factor = getattr(m, "set_gradient_divide_factor", None) or m.set_reduce_scatter_divide_factor
        set_factor(1.0)
        if hasattr(m, "set_force_sum_reduction_for_comms"):  # plain SUM, not PREMUL_SUM(1), which gloo lacks
            m.set_force_sum_reduction_for_comms(True)
    return module
