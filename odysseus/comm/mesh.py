"""The device mesh: which group does what, read from the mesh's dim names.

A strategy runs over the ``sp`` group (the sequence- or tensor-parallel ranks, best kept inside one NVLink
node); the ``ring`` group, where there is one, runs attention over the sequence as a ring of point-to-point
transfers (:mod:`odysseus.comm.ring`), each ring rank holding two chunks of the sequence split over its sp
ranks; the ``dp`` group holds the other replicas of the same shard, each fed its own batch, over which
gradients are summed (or, with ZeRO-3, sharded and reduced by FSDP2). Callers pass any of:

- ``None``, a ``ProcessGroup`` or a 1-D ``DeviceMesh`` (its dim unnamed or named ``sp``, ``cp`` or ``tp``):
  one group, no data parallelism;
- a 2-D ``DeviceMesh`` with dims named ``("dp", "sp")`` (either order) or ``("ring", "sp")`` (sp innermost);
- a 3-D ``DeviceMesh`` with dims named ``("dp", "ring", "sp")``;
- a pair of process groups ``(dp_group, sp_group)``, outer dim first, as a mesh's dims are.

Other dim names raise, naming the dims expected (a mesh is never read by position). :func:`resolve_mesh`
turns each into a :class:`Mesh`. :func:`hsdp_mesh` and :func:`flat_group` build what ZeRO-3's hybrid and
full sharding give FSDP2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .groups import group_rank, group_size, meta_group
from .ledger import name_group

try:
    from torch.distributed.device_mesh import DeviceMesh
except ImportError:  # pragma: no cover - torch builds without distributed
    DeviceMesh = ()

SP_NAMES = ("sp", "cp", "tp")
"""Mesh dim names taken as the dim a strategy runs over."""
DP, RING = "dp", "ring"
_EXPECTED = (
    "a ProcessGroup, a 1-D DeviceMesh, a DeviceMesh with dims named ('dp', 'sp'), ('ring', 'sp') or "
    "('dp', 'ring', 'sp'), a (dp_group, sp_group) pair or None"
)
_HSDP: dict[tuple, DeviceMesh] = {}
_FLAT: dict[tuple, dist.ProcessGroup] = {}
# (dp, sp) sizes of the 2-D meshes that parallel modules of this process were built over: a sequence
# function called without a group then splits over every replica's ranks (see check_default_group).
_MODEL_MESHES: set[tuple[int, int]] = set()


@dataclass(frozen=True, eq=False)
class Mesh:
    """The groups of one rank: ``sp`` runs the strategy, ``dp`` (None: no data parallelism) the replicas.

    ``device_mesh``: the 2-D ``DeviceMesh`` the caller gave, if any, and ``sp_dim`` its dim that is ``sp``.
    """

    sp: dist.ProcessGroup | None
    dp: dist.ProcessGroup | None = None
    device_mesh: DeviceMesh | None = None
    sp_dim: int = 1
    ring: dist.ProcessGroup | None = None
    """The ring attention runs over (None: no ring)."""
    seq: dist.ProcessGroup | None = None
    """Every rank of this replica, ring x sp: the ranks that split one sequence (the sp group without a ring)."""
    seq_grid: tuple[tuple[int, ...], ...] = ()
    """``seq_grid[i][s]``: the rank in ``seq`` of ring rank i, sp rank s."""
    replicas: dist.ProcessGroup | None = None
    """The ranks holding the same weights as this one (dp x ring): a gradient is summed over them."""

    def __post_init__(self) -> None:
        if self.seq is None:  # no ring: the sp group splits the sequence, the dp group holds the replicas
            object.__setattr__(self, "seq", self.sp)
        if self.replicas is None:
            object.__setattr__(self, "replicas", self.dp)

    @property
    def data_parallel(self) -> bool:
        """Whether there is more than one replica to sum gradients over."""
        return group_size(self.dp) > 1

    @property
    def ring_size(self) -> int:
        return group_size(self.ring)


def note_model_mesh(mesh: Mesh) -> None:
    """Remember that a parallel module runs over ``mesh`` (called by the modules' constructors)."""
    if mesh.data_parallel or mesh.ring is not None:
        _MODEL_MESHES.add((group_size(mesh.dp), mesh.ring_size, group_size(mesh.sp)))


def check_default_group(who: str) -> None:
    """Raise where ``who`` was given no group although a model of this process is split over a 2-D mesh.

    The default group holds every rank of the job, so ``shard_sequence(ids)`` would give each rank 1/(dp*sp)
    of the sequence and the layers would run attention over a quarter-sequence of some replica: wrong numbers
    with no error. Every rank built the same modules, so every rank raises here, none waits.
    """
    if _MODEL_MESHES:
        world = dist.get_world_size() if dist.is_initialized() else 1
        meshes = ", ".join(
            f"a 2-D mesh (dp={dp}, sp={sp})" if ring == 1 else f"a mesh (dp={dp}, ring={ring}, sp={sp})"
            for dp, ring, sp in sorted(_MODEL_MESHES)
        )
        raise ValueError(
            f"{who} was called without a group, so it would split over all {world} ranks, but a model of this "
            f"process is split over {meshes}: pass the mesh (the DeviceMesh or the (dp, sp) group pair the model "
            "was parallelized with) as the group"
        )


def is_2d(group) -> bool:
    """Whether ``group`` is one of the meshes of more than one dim (a DeviceMesh or a pair of groups)."""
    return (isinstance(group, DeviceMesh) and group.ndim >= 2) or isinstance(group, (tuple, list))


def ring_mesh(group) -> Mesh | None:
    """The :class:`Mesh` of ``group`` where it has a ring (its sequence layout is then the ring's), else None."""
    if isinstance(group, Mesh) or (isinstance(group, DeviceMesh) and group.ndim >= 2):
        mesh = resolve_mesh(group)
        return mesh if mesh.ring is not None else None
    return None


def resolve_group(group=None) -> dist.ProcessGroup | None:
    """Turn ``None``, a ``ProcessGroup``, a 1-D ``DeviceMesh`` or a 2-D mesh into the ``ProcessGroup`` a strategy
    runs over: for a 2-D ``DeviceMesh`` or a ``(dp_group, sp_group)`` pair, its ``sp`` group
    (:func:`odysseus.comm.mesh.resolve_mesh` gives both).

    ``None`` means the default group, or no group at all (a single process) when torch.distributed has
    not been initialised; every collective is then the identity.
    """
    if group is None:
        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    if is_2d(group):
        return resolve_mesh(group).sp
    if isinstance(group, DeviceMesh):
        names = group.mesh_dim_names
        if names is not None and names[0] not in SP_NAMES:
            raise ValueError(
                f"a 1-D DeviceMesh {tuple(group.shape)} with its dim named {names}: a 1-D mesh is the group a "
                f"strategy runs over, its dim unnamed or named one of {SP_NAMES}; for data parallelism or a ring "
                "give a mesh with dims named ('dp', 'sp'), ('ring', 'sp') or ('dp', 'ring', 'sp')"
            )
        return group.get_group()
    if isinstance(group, dist.ProcessGroup):
        return group
    raise TypeError(f"expected {_EXPECTED}; got {type(group).__name__}")


def resolve_mesh(group=None) -> Mesh:
    """The :class:`Mesh` of ``group`` (see the module docstring for what it may be)."""
    if isinstance(group, Mesh):
        return group
    if isinstance(group, (tuple, list)):
        return _from_pair(group)
    if not is_2d(group):
        return Mesh(resolve_group(group))
    names = tuple(group.mesh_dim_names or ())
    kinds = tuple("sp" if n in SP_NAMES else n for n in names)
    if kinds in (("dp", "sp"), ("sp", "dp")):
        sp_dim = kinds.index("sp")
        sp, dp = group.get_group(sp_dim), group.get_group(1 - sp_dim)
        name_group(sp, "sp")
        name_group(dp, "dp")
        return Mesh(sp, dp, group, sp_dim)
    if kinds in (("ring", "sp"), ("dp", "ring", "sp")):
        return _ring_mesh(group)
    raise ValueError(
        f"a {group.ndim}-D DeviceMesh {tuple(group.shape)} with dims named {group.mesh_dim_names}: expected dims "
        f"named ('dp', 'sp') (either order), ('ring', 'sp') or ('dp', 'ring', 'sp'), sp innermost (sp may also "
        f"be named one of {SP_NAMES}); build it with e.g. init_device_mesh(device, (ring, sp), "
        "mesh_dim_names=('ring', 'sp'))"
    )


def _ring_mesh(dm: DeviceMesh) -> Mesh:
    """The :class:`Mesh` of a ``("ring", "sp")`` or ``("dp", "ring", "sp")`` DeviceMesh, with its flat groups."""
    layout = dm.mesh if dm.ndim == 3 else dm.mesh[None]  # (dp, ring, sp) global ranks
    me = dist.get_rank()
    d, i, s = (int(c) for c in torch.nonzero(layout == me)[0])
    sp, ring = dm.get_group(dm.ndim - 1), dm.get_group(dm.ndim - 2)
    dp = dm.get_group(0) if dm.ndim == 3 else None
    if layout.shape[1] == 1:  # a ring of one rank is no ring: its layout is sp's, its attention the local one
        name_group(sp, "sp")
        name_group(dp, "dp")
        return Mesh(sp, dp, dm, dm.ndim - 1)
    seq = _subgroup(layout[d].flatten().tolist())
    replicas = _subgroup(layout[:, :, s].flatten().tolist())
    ranks = dist.get_process_group_ranks(seq)
    grid = tuple(tuple(ranks.index(int(g)) for g in row) for row in layout[d])
    # The flat groups may be the very group of a dim (the default group, say): the dims' names come last and win.
    for pg, dim in ((seq, "seq"), (replicas, "replicas"), (dp, "dp"), (sp, "sp"), (ring, "ring")):
        name_group(pg, dim)
    return Mesh(sp, dp, dm, dm.ndim - 1, ring=ring, seq=seq, seq_grid=grid, replicas=replicas)


def _subgroup(ranks: list[int]) -> dist.ProcessGroup:
    """A process group over ``ranks`` (cached; the whole world's default group where they are every rank).
    Collective over ``ranks`` the first time."""
    key = tuple(sorted(ranks))
    if key not in _FLAT:
        whole = list(key) == list(range(dist.get_world_size()))
        _FLAT[key] = dist.group.WORLD if whole else dist.new_group(list(key), use_local_synchronization=True)
    return _FLAT[key]


def _from_pair(pair) -> Mesh:
    """A ``(dp_group, sp_group)`` pair, checked: two process groups that share this rank and no other."""
    if len(pair) != 2 or not all(isinstance(g, dist.ProcessGroup) for g in pair):
        kinds = [type(g).__name__ for g in pair]
        raise TypeError(f"expected a (dp_group, sp_group) pair of ProcessGroups, got {kinds}; or {_EXPECTED}")
    dp, sp = pair
    dp_ranks, sp_ranks = dist.get_process_group_ranks(dp), dist.get_process_group_ranks(sp)
    if set(dp_ranks) & set(sp_ranks) != {dist.get_rank()}:
        raise ValueError(
            f"the dp group {dp_ranks} and the sp group {sp_ranks} must share this rank ({dist.get_rank()}) and no "
            "other: each replica (dp) holds one copy of each sequence shard (sp)"
        )
    name_group(sp, "sp")
    name_group(dp, "dp")
    return Mesh(sp, dp)


def _layout(mesh: Mesh) -> torch.Tensor:
    """The global ranks as a ``(dp, seq)`` tensor: row i is the sp group (ring x sp with a ring) of dp rank i
    (collective over dp)."""
    if mesh.ring is not None or (mesh.device_mesh is not None and mesh.device_mesh.ndim == 3):
        layout = mesh.device_mesh.mesh
        return layout.reshape(layout.shape[0] if layout.ndim == 3 else 1, -1)
    if mesh.device_mesh is not None:
        layout = mesh.device_mesh.mesh
        return layout if mesh.sp_dim == 1 else layout.t()
    rows: list = [None] * group_size(mesh.dp)
    dist.all_gather_object(rows, dist.get_process_group_ranks(mesh.sp), group=meta_group(mesh.dp))
    layout = torch.tensor(rows)
    column = layout[:, group_rank(mesh.sp)].tolist()
    if column != dist.get_process_group_ranks(mesh.dp):
        raise ValueError(
            f"the (dp, sp) groups do not form a mesh: the sp groups of the dp ranks are {rows}, so this rank's "
            f"column is {column}, not its dp group {dist.get_process_group_ranks(mesh.dp)}"
        )
    return layout


def hsdp_mesh(mesh: Mesh, device_type: str) -> DeviceMesh:
    """A 2-D ``DeviceMesh`` in (dp, seq) order, built on the mesh's own groups: what FSDP2 ``fully_shard`` takes
    for hybrid sharding (replicate over dim 0, shard over dim 1: sp, or ring x sp). Collective over dp the first
    time."""
    given = mesh.device_mesh
    if given is not None and given.ndim == 2 and mesh.sp_dim == 1 and given.device_type == device_type:
        return given  # already (dp, sp)
    key = (mesh.dp.group_name, mesh.seq.group_name, device_type)
    if key not in _HSDP:
        _HSDP[key] = DeviceMesh.from_group(
            [mesh.dp, mesh.seq], device_type, mesh=_layout(mesh), mesh_dim_names=("dp", "sp")
        )
    return _HSDP[key]


def flat_group(mesh: Mesh) -> dist.ProcessGroup:
    """One process group over every rank of the mesh (dp x ring x sp), for ZeRO-3 sharded over all of them.

    Collective over the mesh's ranks the first time (only they take part in creating it)."""
    key = (mesh.dp.group_name, mesh.seq.group_name)
    if key not in _FLAT:
        _FLAT[key] = _subgroup(_layout(mesh).flatten().tolist())
    return _FLAT[key]
