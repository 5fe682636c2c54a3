"""What :class:`~odysseus.integrations.trainer.OdysseusTrainer` accepts before it splits anything: the
``TrainingArguments`` it can honour, the launched world, and the ``(dp, sp)`` or ``(dp, ring, sp)`` mesh it builds
from them."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import transformers

__all__ = ["check_training_args", "job_mesh", "take_hf_checkpointing", "world_size"]

_MESHES: dict[tuple, object] = {}


def check_training_args(args: transformers.TrainingArguments) -> None:
    """Raise ``ValueError`` for a ``TrainingArguments`` setting that OdysseusTrainer cannot honour: a wrapper that
    would shard or wrap the model a second time, or a loss or step it would not compute. The same arguments on
    every rank give the same error on every rank."""
    refused = {
        "deepspeed": "DeepSpeed would wrap the model a second time; use zero3=True (odysseus.zero3) instead",
        "fsdp": "FSDP would wrap the model a second time; use zero3=True (odysseus.zero3) instead",
        "parallelism_config": "accelerate's own tp/cp/sp would split the model a second time",
        "use_liger_kernel": "Liger's patches would replace modules of the split model; pass loss_chunk= instead",
        "label_smoothing_factor": "the odysseus loss has no label smoothing",
        "torch_compile": "compile the model yourself (docs/COMPILE.md); Trainer would compile the split model",
        "load_best_model_at_end": "the best checkpoint is not reloaded; resume from it instead",
        "auto_find_batch_size": "the batch must be split evenly over the replicas",
    }
    for field, why in refused.items():
        value = getattr(args, field, None)
        if value:  # None, False, 0, "" and [] are the defaults that mean "off"
            raise ValueError(f"OdysseusTrainer: TrainingArguments({field}={value!r}) is not supported: {why}")


def take_hf_checkpointing(args: transformers.TrainingArguments) -> bool:
    """Whether ``args`` ask for activation checkpointing (``activation_checkpointing``, or its old name
    ``gradient_checkpointing``, which TRL's SFTConfig turns on by default); turns the flag off in ``args``. Hugging
    Face's checkpointing would not reach the odysseus layers, so the trainer recomputes them itself
    (``parallelize_llama(checkpoint=True)``): the same numbers, the same saving."""
    wanted = bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))
    for field in ("activation_checkpointing", "gradient_checkpointing"):
        if hasattr(args, field):
            setattr(args, field, False)
    return wanted


def world_size() -> int:
    """The job's world size; refuses a launch whose ranks transformers did not join into one process group."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != launched:
        raise RuntimeError(
            f"OdysseusTrainer: WORLD_SIZE={launched} processes were launched but torch.distributed holds {world}; on "
            "a machine without GPUs pass TrainingArguments(use_cpu=True), so that accelerate starts the gloo group"
        )
    return world


def job_mesh(device: torch.device, dp: int, ring: int, sp: int):
    """The job's ``(dp, sp)`` DeviceMesh, or ``(dp, ring, sp)`` with a ring (dp-major, sp innermost: an sp
    group's ranks are consecutive, so it sits inside a node), one per shape."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (device.type, dp, ring, sp)
    if key not in _MESHES:  # init_device_mesh makes new groups on every call
        if ring == 1:
            _MESHES[key] = init_device_mesh(device.type, (dp, sp), mesh_dim_names=("dp", "sp"))
        else:
            _MESHES[key] = init_device_mesh(device.type, (dp, ring, sp), mesh_dim_names=("dp", "ring", "sp"))
    return _MESHES[key]
