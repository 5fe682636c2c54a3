"""Resuming an :class:`~odysseus.integrations.trainer.OdysseusTrainer` run: the dense checkpoint loaded into the
split model, every rank's optimizer state, and the layout both depend on."""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..comm.groups import group_rank, group_size
from ..strategies.module import ParamSpec
from ..training.state import _specs, is_dtensor

LAYOUT_NAME = "odysseus_layout.json"
_WEIGHTS, _INDEX = "model.safetensors", "model.safetensors.index.json"


def save_layout(path: str, layout: dict) -> None:
    """Record the run's layout (strategy, world size, replicas) beside its optimizer shards."""
    with open(os.path.join(path, LAYOUT_NAME), "w") as f:
        json.dump(layout, f)


def _read_dense(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``save_pretrained`` directory (one safetensors file or an index of several)."""
    from safetensors.torch import load_file

    if os.path.isfile(os.path.join(path, _WEIGHTS)):
        return load_file(os.path.join(path, _WEIGHTS))
    if not os.path.isfile(os.path.join(path, _INDEX)):
        raise FileNotFoundError(f"{path} holds neither {_WEIGHTS} nor {_INDEX}")
    with open(os.path.join(path, _INDEX)) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    return {k: v for name in files for k, v in load_file(os.path.join(path, name)).items()}


@torch.no_grad()
def load_dense(model: nn.Module, path: str) -> None:
    """Copy the dense weights saved in ``path`` into ``model`` split by ``parallelize_llama`` (optionally
    ``zero3``): each rank takes its rows of a split weight, its FSDP2 shard of a sharded one. No communication."""
    from torch.distributed.tensor import distribute_tensor

    dense = _read_dense(path)
    specs = _specs(model)
    names = {id(p): n for n, p in model.named_parameters()}
    done: set[int] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if key not in dense:
            if id(t) in done:  # a tied weight, saved once
                continue
            raise KeyError(f"{path} holds no {key!r}; it was not saved from this model")
        src = dense[key]
        spec, pg = specs.get(names.get(id(t), ""), (ParamSpec(), None))
        if spec.dim is not None and group_size(pg) > 1:
            start, end = spec.ranges[group_rank(pg)]
            src = src.narrow(spec.dim, start, end - start)
        src = src.to(t.device, t.dtype)
        if is_dtensor(t):  # this rank's FSDP2 shard, cut locally (src_data_rank=None: no scatter)
            src = distribute_tensor(src, t.device_mesh, t.placements, src_data_rank=None)
        t.copy_(src)
        done.add(id(t))


def _optimizer_file(path: str, rank: int) -> str:
    return os.path.join(path, f"optimizer_rank{rank}.pt")


def save_optimizer(optimizer: torch.optim.Optimizer, path: str, rank: int) -> None:
    """This rank's optimizer state (its share of every split or sharded weight's), to its own file."""
    os.makedirs(path, exist_ok=True)
    state = optimizer.state_dict()
    state["state"] = {
        i: {k: v.to_local() if is_dtensor(v) else v for k, v in s.items()} for i, s in state["state"].items()
    }
    torch.save(state, _optimizer_file(path, rank))


def load_optimizer(optimizer: torch.optim.Optimizer, path: str, rank: int, layout: dict) -> bool:
    """Load what :func:`save_optimizer` wrote for this rank (ZeRO-3 states become DTensors again); False where
    ``path`` holds no optimizer state (a checkpoint saved with ``save_only_model``: Trainer then starts the
    optimizer afresh too). Raises ``ValueError`` where the state cannot be this run's: a dense Trainer's
    ``optimizer.pt``, or a run with another layout (the shards hold each rank's share of the split weights). Every
    rank reads the same files and raises alike."""
    from torch.distributed.tensor import DTensor

    file = os.path.join(path, LAYOUT_NAME)
    if not os.path.isfile(file):
        if os.path.isfile(os.path.join(path, "optimizer.pt")):
            raise ValueError(
                f"{path} holds a dense Trainer's optimizer.pt, which cannot be split over this run's ranks: start "
                "from its weights (from_pretrained) with a fresh optimizer instead of resuming"
            )
        return False
    with open(file) as f:
        saved = json.load(f)
    if saved != layout:
        raise ValueError(f"{path} was written by a run with layout {saved}; this run is {layout}: resume with that")
    state = torch.load(_optimizer_file(path, rank), map_location="cpu", weights_only=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, s in state["state"].items():
        p = params[i]
        if not is_dtensor(p):
            continue
        for k, v in s.items():
            if v.shape == p.to_local().shape and v.dim() > 0:  # moments, not Adam's scalar step
                s[k] = DTensor.from_local(
                    v.to(p.device), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                )
    optimizer.load_state_dict(state)
    return True
