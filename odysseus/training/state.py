"""The state of a parallel model: dense tensors out of it, its gradients made whole, its weights sharded.

``dense_state_dict`` reassembles the dense tensors (or gradients) from every rank's share;
``finalize_grads`` sums the partial gradients of replicated weights (and of kv heads held by several
ranks), then, on a 2-D mesh, every gradient over the data-parallel replicas; ``zero3`` shards the replicated
weights with FSDP2 instead (over ``sp``, over ``dp x sp``, or hybrid). ``sum_over_group`` is the bucketed
gradient all-reduce they share with the Hugging Face integration.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..comm import primitives
from ..comm.groups import group_rank, group_size
from ..comm.ledger import phase
from ..comm.mesh import Mesh, flat_group, hsdp_mesh, resolve_mesh
from ..overlap import check_overlap
from ..strategies.module import ParamSpec


def _specs(module: nn.Module) -> dict[str, tuple[ParamSpec, object]]:
    """Full parameter name -> (spec, process group), for every parameter of ``module`` that has a spec."""
    out = {}
    for prefix, m in module.named_modules():
        for name, spec in getattr(m, "param_specs", {}).items():
            out[f"{prefix}.{name}" if prefix else name] = (spec, m.pg)
    return out


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2-sharded parameter or its gradient)."""
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

    ``grad=True`` returns the gradients instead, of the parameters that require grad (frozen ones have
    none); call :func:`finalize_grads` first so replicated and shared weights hold their complete gradients.
    FSDP2-sharded weights are gathered too.
    """
    specs = _specs(module)
    out = {}
    for name, p in module.named_parameters():
        if grad and not p.requires_grad:
            continue
        t = p.grad if grad else p.detach()
        if t is None:
            raise RuntimeError(f"{name} has no gradient; run backward() (and finalize_grads) first")
        if is_dtensor(t):
            t = t.full_tensor()
        spec, pg = specs.get(name, (ParamSpec(), None))
        if spec.dim is not None and group_size(pg) > 1:
            t = _assemble(t, spec, pg, name)
        out[name] = t.detach().clone()
    return out


def sum_over_group(tensors: list[torch.Tensor], pg, label: str) -> list[torch.Tensor]:
    """Sum each tensor over the ranks of ``pg``: one all-reduce per (dtype, device) bucket, recorded in the
    CommLedger as a backward ``gradient`` collective. Returns new tensors, in order (inputs untouched)."""
    buckets: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    out: list[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for members in buckets.values():
        with phase("backward"):
            flat = primitives.all_reduce(
                torch.cat([tensors[i].reshape(-1) for i in members]), pg, category="gradient", label=label
            )
        for i, summed in zip(members, flat.split([tensors[i].numel() for i in members])):
            out[i] = summed.view(tensors[i].shape)
    return out


def _mesh_of(module: nn.Module) -> Mesh | None:
    """The :class:`~odysseus.comm.mesh.Mesh` of the parallel modules inside ``module`` (None if there are none);
    ``ValueError`` if they were built on different data-parallel groups."""
    meshes = {id(m.mesh.dp): m.mesh for m in module.modules() if hasattr(m, "param_specs") and hasattr(m, "mesh")}
    if len(meshes) > 1:
        raise ValueError(f"{type(module).__name__} holds parallel modules on {len(meshes)} data-parallel groups")
    return next(iter(meshes.values()), None)


def _reduced_by_fsdp(p: nn.Parameter, dp) -> bool:
    """Whether FSDP2 reduces ``p``'s gradient over the data-parallel ranks itself (hybrid or full sharding)."""
    if not is_dtensor(p):
        return False
    ranks = set(p.device_mesh.mesh.flatten().tolist())
    return len(ranks & set(dist.get_process_group_ranks(dp))) > 1


def finalize_grads(module: nn.Module) -> None:
    """Sum the partial gradients of replicated (and GQA-shared) weights over their group, in place; then, where
    the parallel modules sit on a 2-D mesh, sum every gradient of ``module`` over the data-parallel group.

    A split weight whose rows live on several ranks (a kv head shared by query heads of two ranks) is
    summed through a zero-padded dense buffer. One all-reduce per (group, dtype, device) bucket; a no-op
    where nothing needs syncing. FSDP2-managed weights are skipped where FSDP2 reduces them (over ``sp``
    always; over ``dp`` too under hybrid or full sharding), and summed over ``dp`` here where it shards over
    ``sp`` alone. Frozen weights (``requires_grad=False``, the same on every rank) are skipped too: they get no
    gradient, so an optimizer with weight decay leaves them alone. On a 2-D mesh call it once per step on the
    whole model: every parameter of ``module`` (embeddings included) is summed over ``dp``.
    Collective: call on every rank. Also the once-per-step check of the symm kernels' waits
    (:func:`odysseus.check_overlap`), which raises ``TimeoutError`` if one gave up this step.
    """
    check_overlap()
    specs = _specs(module)
    groups: dict[object, list] = {}
    for name, p in module.named_parameters():
        spec, pg = specs.get(name, (ParamSpec(), None))
        if spec.sync != "sum" or group_size(pg) == 1 or is_dtensor(p) or not p.requires_grad:
            continue
        groups.setdefault(pg, []).append((p, spec, group_rank(pg)))
    for pg, params in groups.items():
        dense = []
        for p, spec, rank in params:
            if p.grad is None:  # a rank whose tokens did not reach this weight still adds its zeros
                p.grad = torch.zeros_like(p)
            g = p.grad
            if spec.dim is not None:
                s, e = spec.ranges[rank]
                padded = g.new_zeros(_dense_shape(g, spec))
                padded.narrow(spec.dim, s, e - s).copy_(g)
                g = padded
            dense.append(g)
        for (p, spec, rank), summed in zip(params, sum_over_group(dense, pg, "grads")):
            if spec.dim is not None:
                s, e = spec.ranges[rank]
                summed = summed.narrow(spec.dim, s, e - s)
            p.grad.copy_(summed)  # in place: no second copy of the gradients while the flat buffer lives
    mesh = _mesh_of(module)
    if mesh is not None and group_size(mesh.replicas) > 1:
        _sum_over_replicas(module, mesh)


def _sum_over_replicas(module: nn.Module, mesh: Mesh) -> None:
    """Sum every gradient of ``module`` over the ranks holding the same weights (each saw its own tokens): the
    replicas, dp x ring; a ZeRO-3 shard over dp alone, where FSDP2 has not (it reduces over sp, or ring x sp)."""
    dp, params, groups = mesh.dp, [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        fsdp_left_dp = mesh.data_parallel and not _reduced_by_fsdp(p, dp)
        group = mesh.replicas if not is_dtensor(p) else dp if fsdp_left_dp else None
        if group_size(group) > 1:
            params.append(p)
            groups.append(group)
    for pg in dict.fromkeys(groups):
        mine = [p for p, g in zip(params, groups) if g is pg]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in mine]
        local = [g.to_local() if is_dtensor(g) else g for g in grads]  # sharded ZeRO-3: this rank's shard
        label = "dp grads" if pg is dp else "replica grads"
        for p, g, t, summed in zip(mine, grads, local, sum_over_group(local, pg, label)):
            t.copy_(summed)
            p.grad = g


ZERO3_SHARDING = ("sp", "hybrid", "full")
"""How :func:`zero3` shards on a 2-D mesh: over ``sp`` alone (gradients then summed over ``dp`` by
``finalize_grads``), ``hybrid`` (FSDP2's HSDP: shard over ``sp``, replicate over ``dp``) or ``full`` (over
every rank of ``dp x sp``). On a mesh with a ring, ``sp`` here means ``ring x sp``: the ranks that split one
sequence."""


def _fsdp_mesh(mesh: Mesh, shard: str, device_type: str):
    from torch.distributed.device_mesh import DeviceMesh

    if shard == "hybrid":
        return hsdp_mesh(mesh, device_type)
    return DeviceMesh.from_group(flat_group(mesh) if shard == "full" else mesh.seq, device_type)


def zero3(module: nn.Module, mesh=None, *, shard: str | None = None, **fsdp_kwargs) -> nn.Module:
    """Shard the replicated weights of a parallel module with FSDP2 ``fully_shard`` (ZeRO-3), in place.

    Sharded on the module's own group: "Odysseus+ZeRO3" shards the FFN and norms, "Ulysses+ZeRO3" every
    weight, TP-SP its norms. On a 2-D mesh (the one given to ``parallelize``; ``mesh``, if passed, must be
    it) ``shard`` picks one of :data:`ZERO3_SHARDING`: ``"hybrid"`` (the default there) shards within ``sp`` and
    replicates across ``dp``, ``"full"`` shards over every rank of the mesh, ``"sp"`` shards over ``sp`` and
    leaves the ``dp`` sum to ``finalize_grads``. FSDP2 averages gradients by default; this sets its divide
    factor to 1 to keep the sum-of-local-losses convention, so gradients still equal the reference's. Weights
    are resharded after forward by default (each sharded module is its own FSDP root, whose default would keep
    them gathered until backward and lose ZeRO-3's memory saving). Returns ``module``.
    """
    fsdp_kwargs.setdefault("reshard_after_forward", True)
    from torch.distributed.fsdp import fully_shard

    found = _mesh_of(module)
    if mesh is not None:
        given = resolve_mesh(mesh)
        if found is None or (given.sp, given.dp) != (found.sp, found.dp):
            raise ValueError(
                "zero3: the mesh passed differs from the one the module was parallelized on; pass that mesh (or "
                "none) and build the module with parallelize(..., mesh)"
            )
    dp = found is not None and found.data_parallel
    shard = shard or ("hybrid" if dp else "sp")
    if shard not in ZERO3_SHARDING:
        raise ValueError(f"zero3: unknown shard={shard!r}; expected one of {ZERO3_SHARDING}")
    if shard != "sp" and not dp:
        raise ValueError(f"zero3: shard={shard!r} needs a 2-D (dp, sp) mesh; the module runs on one group")
    targets: dict[str, tuple[nn.Module, Mesh]] = {}  # name -> (module to shard, its mesh)
    for prefix, m in module.named_modules():
        specs = getattr(m, "param_specs", {})
        replicated = [n for n, s in specs.items() if s.dim is None and s.sync == "sum"]
        if not replicated:
            continue
        if len(replicated) == len(list(m.parameters())):
            targets[prefix] = (m, m.mesh)
            continue
        for name in replicated:
            owner = name.rsplit(".", 1)[0]
            targets[f"{prefix}.{owner}" if prefix else owner] = (m.get_submodule(owner), m.mesh)
    # Shard inner modules before outer ones, as fully_shard expects.
    for _, (m, m_mesh) in sorted(targets.items(), key=lambda kv: -kv[0].count(".")):
        device_type = next(m.parameters()).device.type
        fully_shard(m, mesh=_fsdp_mesh(m_mesh, shard, device_type), **fsdp_kwargs)
        set_factor = getattr(m, "set_gradient_divide_factor", None) or m.set_reduce_scatter_divide_factor
        set_factor(1.0)
        if hasattr(m, "set_force_sum_reduction_for_comms"):  # plain SUM, not PREMUL_SUM(1), which gloo lacks
            m.set_force_sum_reduction_for_comms(True)
    return module
