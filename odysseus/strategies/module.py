"""What every parallel module shares: its group, and how each local parameter maps to the dense one."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..comm import group_rank, group_size, meta_group, resolve_group
from ..config import TransformerConfig
from ..layout import dense_shapes
from ..overlap import check_backend
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


def deepcopy_sharing_group(module: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a module that holds a process group: everything is copied but the group, which the
    copy shares (a ProcessGroup cannot be copied or pickled; an EMA copy runs on the same ranks)."""
    if module.pg is not None:
        memo.setdefault(id(module.pg), module.pg)
    new = type(module).__new__(type(module))
    memo[id(module)] = new
    new.__setstate__(copy.deepcopy(module.__dict__, memo))
    track(new)
    return new


class ParallelModule(nn.Module):
    """Base of every strategy module: the group, this rank's place in it, and :class:`ParamSpec` per parameter.

    ``weights`` maps linear-layer names (``q_proj``...) to dense ``(out, in)`` tensors to slice; without
    it, each dense weight is drawn by :func:`odysseus.reference.seeded_normal` (``seed``, ``std``), so a
    fresh parallel module equals ``init_weights(reference_module, std, seed)`` on every world size.
    ``check_finite=True`` makes every forward reject an input holding NaN or Inf (on all ranks at once
    where the module exchanges lengths anyway). ``check_inputs=True`` makes every forward compare a
    fingerprint of the ranks' inputs, so that the whole sequence fed to every rank of a sequence-split
    module (or shards fed to a TP one) raises on every rank (it synchronises the host with the device).
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
        check_inputs: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"expected a TransformerConfig, got {type(config).__name__}")
        self.config = config
        self.pg = resolve_group(group)
        self.world, self.rank = group_size(self.pg), group_rank(self.pg)
        self.backend = check_backend(backend)
        self.check_finite, self.check_inputs = check_finite, check_inputs
        self.param_specs: dict[str, ParamSpec] = {}
        # A private copy of the mapping: add_linear takes each dense weight out once it is sliced, so no
        # reference to the dense tensors outlives construction.
        self._weights, self._seed, self._std = None if weights is None else dict(weights), seed, std
        self._device, self._dtype = device, dtype
        meta_group(self.pg)  # collective on first use: every rank builds its modules, so do it here
        track(self)

    def __deepcopy__(self, memo: dict) -> ParallelModule:
        return deepcopy_sharing_group(self, memo)

    def add_linear(self, name: str, dim: int | None = None, ranges=(), sync: str = "none") -> None:
        """Create ``self.<name>`` holding this rank's slice of the dense linear weight ``name``."""
        shape = dense_shapes(self.config)[name]
        if self._weights is not None:
            dense = self._weights.pop(name).detach()
            if tuple(dense.shape) != shape:
                raise ValueError(f"{name}: dense weight has shape {tuple(dense.shape)}, expected {shape}")
        else:
            dense = seeded_normal(name, shape, self._seed, self._std)
        if dim is not None:
            s, e = ranges[self.rank]
            dense = dense.narrow(dim, s, e - s)
        device = self._device if self._device is not None else dense.device
        dtype = self._dtype if self._dtype is not None else dense.dtype
        lin = nn.Linear(dense.shape[1], dense.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(dense.to(device=device, dtype=dtype, copy=True))
        setattr(self, name, lin)
        self.param_specs[f"{name}.weight"] = ParamSpec(dim, tuple(ranges), sync)

    @property
    def sequence_split(self) -> bool:
        """Whether this module takes ``shard_sequence`` shards (else the full sequence on every rank)."""
        return self.region.sequence_split

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world={self.world}, backend={self.backend!r}"

    @classmethod
    def from_dense(cls, ref: nn.Module, group=None, **kwargs) -> ParallelModule:
        """This rank's share of the reference module ``ref`` (same device and dtype as ``ref``)."""
        weights = {n: m.weight for n, m in ref.named_children() if isinstance(m, nn.Linear)}
        return cls(ref.config, group, weights=weights, **kwargs)
