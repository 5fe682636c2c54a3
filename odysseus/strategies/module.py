"""What every parallel module shares: its group, and how each local parameter maps to the dense one."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..comm import group_rank, group_size, meta_group
from ..comm.mesh import note_model_mesh, resolve_mesh
from ..config import TransformerConfig
from ..layout import dense_shapes, has_bias
from ..overlap import DEFAULT_RING, Ring, check_backend
from ..overlap.ops import check_save_input
from ..reference import seeded_normal


@dataclass(frozen=True)
class ParamSpec:
    """How a local parameter relates to the dense parameter of the same name.

    ``dim is None``: the whole tensor is replicated. Otherwise rank j holds rows ``ranges[j]`` of dense
    dim ``dim`` (ranges may overlap: a kv head needed by several ranks). ``sync="sum"`` means the local
    gradients are partial and ``finalize_grads`` must sum them over the ranks that hold the same entries.
    """

    dim: int | None = None
    ranges: tuple[tuple[int, int], ...] = ()
    sync: str = "none"


_LIVE: weakref.WeakSet = weakref.WeakSet()  # every parallel module and block alive in this process


def track(module: nn.Module) -> None:
    """Remember a module holding ``param_specs`` and ``pg``, so a bare list of parameters can be classified."""
    _LIVE.add(module)


def live_specs() -> Iterator[tuple[nn.Module, str, ParamSpec]]:
    """(module, parameter name, spec) of every live parallel module (see :func:`track`)."""
    for m in list(_LIVE):
        for name, spec in getattr(m, "param_specs", {}).items():
            yield m, name, spec


ZERO3_DEEPCOPY = (
    "copy.deepcopy of a ZeRO-3 model (odysseus.zero3, FSDP2) is not supported: FSDP2's sharded parameters and "
    "hooks cannot be copied. Deepcopy the model before zero3() and shard the copy too; or, for an EMA, keep "
    "shard-wise averages: ema = {n: p.detach().clone() for n, p in model.named_parameters()} and after each "
    "optimizer step, under torch.no_grad(), ema[n].lerp_(p.detach(), 1 - decay); odysseus.dense_state_dict "
    "(hf_state_dict for a parallelize_llama model) gathers the dense tensors to save or evaluate"
)


def deepcopy_sharing_group(module: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a module that holds a process group: everything is copied but the groups (and the
    mesh), which the copy shares (a ProcessGroup cannot be copied or pickled; an EMA copy runs on the same ranks).
    ``TypeError`` with a recipe for a ZeRO-3 module, which FSDP2 cannot copy."""
    if any(hasattr(p, "placements") for p in module.parameters()):  # DTensors: sharded by FSDP2
        raise TypeError(ZERO3_DEEPCOPY)
    for shared in (module.pg, module.mesh, module.mesh.dp, module.mesh.device_mesh):
        if shared is not None:
            memo.setdefault(id(shared), shared)
    new = type(module).__new__(type(module))
    memo[id(module)] = new
    new.__setstate__(copy.deepcopy(module.__dict__, memo))
    track(new)
    return new


class ParallelModule(nn.Module):
    """Base of every strategy module: the group, this rank's place in it, and :class:`ParamSpec` per parameter.

    ``group``: see :func:`odysseus.parallelize`; on a 2-D mesh the module runs over its ``sp`` group (``pg``)
    and keeps the whole :class:`~odysseus.comm.mesh.Mesh` (``mesh``) for the gradient sum over ``dp``.

    ``weights`` maps the dense parameter names (``q_proj.weight``, ``q_proj.bias``...) to the dense
    tensors to take this rank's share of; it must hold a bias exactly where the config has one. Without it,
    each dense weight is drawn by :func:`odysseus.reference.seeded_normal` (``seed``, ``std``) and biases
    are zero, so a fresh parallel module equals ``init_weights(reference_module, std, seed)`` on every world
    size.
    ``check_finite=True`` makes every forward reject an input holding NaN or Inf (on all ranks at once
    where the module exchanges lengths anyway). ``save_input`` (``"gathered"`` or ``"shard"``) and ``ring``
    choose what an all-gather⊗GEMM keeps for backward and how gathers stream (:mod:`odysseus.overlap.ops`).
    ``check_inputs`` compares a fingerprint of the ranks' inputs inside the length exchange, so that the whole
    sequence fed to every rank of a sequence-split module (or shards fed to a TP one) raises on every rank:
    ``None`` (the default) checks without making the host wait for the device (on an accelerator, each call
    compares the previous call's inputs, :mod:`odysseus.comm.prints`), ``True`` checks every call at once
    (waiting for the device), ``False`` does not check. A block checks in its first module only, unless True.
    ``ffn_tile``: the FFNs run that many tokens per rank at a time, recomputing each tile in backward
    (:mod:`odysseus.strategies.ffn`); attention modules ignore it.
    """

    def __init__(
        self,
        config: TransformerConfig,
        group=None,
        *,
        backend: str = "auto",
        weights: Mapping[str, torch.Tensor] | None = None,
        seed: int = 0,
        std: float = 0.02,
        check_finite: bool = False,
        save_input: str = "gathered",
        ring: Ring | None = None,
        check_inputs: bool | None = None,
        ffn_tile: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"expected a TransformerConfig, got {type(config).__name__}")
        self.config = config
        # The strategy runs over the mesh's sp group; dp (if any) only sums gradients (odysseus.finalize_grads).
        self.mesh = resolve_mesh(group)
        note_model_mesh(self.mesh)
        self.pg = self.mesh.sp
        self.world, self.rank = group_size(self.pg), group_rank(self.pg)
        self.backend = check_backend(backend)
        self.check_finite, self.check_inputs = check_finite, check_inputs
        self.save_input, self.ring = check_save_input(save_input), ring or DEFAULT_RING
        if ffn_tile is not None and ffn_tile < 1:
            raise ValueError(f"ffn_tile={ffn_tile} must be a positive number of tokens (or None: no tiling)")
        self.ffn_tile = ffn_tile
        self.param_specs: dict[str, ParamSpec] = {}
        # A private copy of the mapping: add_linear takes each dense weight out once it is sliced, so no
        # reference to the dense tensors outlives construction.
        self._weights, self._seed, self._std = None if weights is None else dict(weights), seed, std
        self._device, self._dtype = device, dtype
        meta_group(self.pg)  # collective on first use: every rank builds its modules, so do it here
        track(self)

    def __deepcopy__(self, memo: dict) -> ParallelModule:
        return deepcopy_sharing_group(self, memo)

    def add_linear(
        self, name: str, dim: int | None = None, ranges=(), sync: str = "none", row_bias_sync: str = "none"
    ) -> None:
        """Create ``self.<name>`` holding this rank's slice of the dense linear layer ``name`` (and its bias).

        ``dim=0`` (split by output rows): the bias is split with the rows. ``dim=1`` (split by input columns, a
        partial product summed over ranks): the whole bias sits on every rank and the caller adds it once,
        after the sum; ``row_bias_sync="sum"`` where each rank adds it to its own tokens only (its gradient is
        then partial). ``dim=None``: weight and bias whole, both with ``sync``.
        """
        shape = dense_shapes(self.config)[name]
        biased = has_bias(self.config, name)
        weight, bias = self._dense(name, shape, biased)
        trainable = weight.requires_grad, bias is not None and bias.requires_grad
        if dim is not None:
            s, e = ranges[self.rank]
            weight = weight.narrow(dim, s, e - s)
            if dim == 0 and bias is not None:
                bias = bias.narrow(0, s, e - s)
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=biased, device="meta")
        lin.weight = self._param(weight, trainable[0])
        self.param_specs[f"{name}.weight"] = ParamSpec(dim, tuple(ranges), sync)
        if bias is not None:
            lin.bias = self._param(bias, trainable[1])
            self.param_specs[f"{name}.bias"] = _bias_spec(dim, ranges, sync, row_bias_sync, shape[0], self.world)
        setattr(self, name, lin)

    def _dense(self, name: str, shape: tuple[int, int], biased: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense weight and bias of ``name``: from ``weights``, or freshly drawn (bias zero). Each keeps its
        ``requires_grad`` (a frozen dense weight gives frozen shards), without the dense tensor's autograd graph."""
        if self._weights is None:
            weight = seeded_normal(name, shape, self._seed, self._std).requires_grad_()
            return weight, weight.new_zeros(shape[0]).requires_grad_() if biased else None
        # Taken out of the private copy: no reference to the dense tensors outlives construction.
        weight = self._weights.pop(f"{name}.weight", None)
        if weight is None:
            raise ValueError(f"{name}.weight is missing from the weights (keys left: {sorted(self._weights)})")
        bias = self._weights.pop(f"{name}.bias", None)
        if biased != (bias is not None):
            flag = {"o_proj": "o_bias"}.get(name, "qkv_bias" if name[0] in "qkv" else "mlp_bias")
            raise ValueError(
                f"{name}.bias is {'missing from' if biased else 'in'} the weights but the config has {flag}={biased}"
            )
        for what, t, want in (("weight", weight, shape), ("bias", bias, shape[:1])):
            if t is not None and tuple(t.shape) != want:
                raise ValueError(f"{name}: dense {what} has shape {tuple(t.shape)}, expected {want}")
        return _detached(weight), None if bias is None else _detached(bias)

    def _param(self, dense: torch.Tensor, requires_grad: bool) -> nn.Parameter:
        device = self._device if self._device is not None else dense.device
        dtype = self._dtype if self._dtype is not None else dense.dtype
        return nn.Parameter(dense.detach().to(device=device, dtype=dtype, copy=True), requires_grad=requires_grad)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world={self.world}, backend={self.backend!r}"

    @classmethod
    def from_dense(cls, ref: nn.Module, group=None, **kwargs) -> ParallelModule:
        """This rank's share of the reference module ``ref`` (same device and dtype as ``ref``)."""
        return cls(ref.config, group, weights=dict(ref.state_dict(keep_vars=True)), **kwargs)


class RegionModule(ParallelModule):
    """A parallel module whose activations sit in a region (:mod:`.regions`), bound once at construction.

    Subclasses name the region type; the variants of a module (TP and TP-SP attention, say) differ only in it.
    """

    region_type: type

    def __init__(self, config: TransformerConfig, group=None, **kwargs):
        super().__init__(config, group, **kwargs)
        self.region = self.region_type(self, type(self).__name__)
        if self.mesh.ring is not None and not self.region.sequence_split:
            raise ValueError(
                f"{type(self).__name__}: a mesh with a ring dim ({self.mesh.ring_size} ring ranks) splits the "
                "sequence, but this module holds the whole sequence on every rank ('tp'); use 'tp-sp', 'ulysses' or "
                "'odysseus' with a ring, or a mesh without one"
            )

    @property
    def sequence_split(self) -> bool:
        """Whether this module takes ``shard_sequence`` shards (else the full sequence on every rank)."""
        return self.region.sequence_split

    def extra_repr(self) -> str:
        return f"{self.region!r}, {super().extra_repr()}"


def trainable(dense: torch.Tensor) -> bool:
    """Whether the shards of a given dense tensor train: a parameter's ``requires_grad`` carries over (frozen
    stays frozen); a plain tensor (a ``state_dict()`` value, detached) gives trainable shards."""
    return dense.requires_grad if isinstance(dense, nn.Parameter) else True


def _detached(t: torch.Tensor) -> torch.Tensor:
    """``t`` cut from its autograd graph, saying whether its shards train (:func:`trainable`)."""
    return t.detach().requires_grad_(trainable(t))


def _bias_spec(dim, ranges, sync: str, row_bias_sync: str, rows: int, world: int) -> ParamSpec:
    if dim == 0:
        return ParamSpec(0, tuple(ranges), sync)
    if dim is None:
        return ParamSpec(None, (), sync)
    if row_bias_sync == "none":
        return ParamSpec()
    # A row-split layer's bias, whole on every rank, each adding it to its own tokens. Described as every rank
    # holding all rows of a split dim rather than as replicated (dim=None): finalize_grads sums it all the same,
    # and zero3, which shards whole submodules holding replicated weights, then leaves the split weight beside
    # it alone.
    return ParamSpec(0, ((0, rows),) * world, row_bias_sync)
