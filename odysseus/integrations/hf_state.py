"""Gradients and checkpoints of a :func:`~odysseus.integrations.hf.parallelize_llama` model."""

from __future__ import annotations

import os
import types

import torch
import torch.distributed as dist
from torch import nn

from ..comm.groups import group_size
from ..training.state import dense_state_dict, finalize_grads, is_dtensor, sum_over_group
from .hf_layer import layers, model_setup

__all__ = ["finalize_model_grads", "guard_save_pretrained", "hf_state_dict", "save_pretrained"]


def finalize_model_grads(model: nn.Module) -> None:
    """Make every gradient of a :func:`parallelize_llama` model equal the unsplit model's, in place.

    Sequence-split strategies: the embeddings, final norm and LM head saw only this rank's tokens, so their
    gradients are summed over the group (one all-reduce per dtype and device, recorded by the CommLedger as
    ``category="gradient"``). Then :func:`odysseus.finalize_grads` syncs the layers' replicated weights. For
    ``"tp"`` every rank saw the whole sequence and the same loss: only the layers need it. FSDP2-sharded
    weights are left to FSDP2. On a 2-D mesh every gradient is then summed over the data-parallel replicas
    (see :func:`odysseus.finalize_grads`). Collective: call on every rank after ``backward()``.
    """
    spec, pg = model_setup(model)
    if spec.sequence_split and group_size(pg) > 1:
        in_layers = {id(p) for layer in layers(model) for p in layer.parameters()}
        params = [p for p in model.parameters() if id(p) not in in_layers and p.requires_grad and not is_dtensor(p)]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p, summed in zip(params, sum_over_group(grads, pg, "model grads")):
            p.grad = summed.clone()
    finalize_grads(model)


def hf_state_dict(model: nn.Module, grad: bool = False) -> dict[str, torch.Tensor]:
    """The unsplit model's state dict (or, with ``grad=True``, its parameter gradients) under the Hugging Face
    keys of ``model.state_dict()``: full tensors, the same on every rank, loadable into a fresh
    ``transformers`` model with ``load_state_dict``. Tied weights appear under each of their keys as separate
    tensors. ``grad=True`` leaves out buffers and frozen (``requires_grad=False``) parameters. Collective:
    call on every rank (after :func:`finalize_model_grads` for ``grad=True``).
    """
    dense = dense_state_dict(model, grad=grad)
    param_name = {id(p): name for name, p in model.named_parameters()}
    out, used = {}, set()
    for key, t in model.state_dict(keep_vars=True).items():
        name = param_name.get(id(t))
        if name is None or name not in dense:  # a buffer, or a frozen parameter's missing gradient
            if not grad:
                out[key] = t.detach().clone()
            continue
        out[key] = dense[name].clone() if name in used else dense[name]
        used.add(name)
    return out


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Write the unsplit model as a ``transformers`` checkpoint: ``config.json`` and ``model.safetensors``.

    ``LlamaForCausalLM.from_pretrained(save_directory)`` (or the class of ``model``) loads it on one device.
    Global rank 0 writes; every rank gathers (collective) and waits until the files exist.
    """
    from safetensors.torch import save_file

    if not hasattr(getattr(model, "config", None), "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no transformers config to save; pass the PreTrainedModel")
    state = hf_state_dict(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(save_directory, exist_ok=True)
        model.config.save_pretrained(save_directory)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(tensors, os.path.join(save_directory, "model.safetensors"), metadata={"format": "pt"})
    if dist.is_initialized():
        dist.barrier()


def _hf_save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
    """Hugging Face's ``save_pretrained``, allowed only with dense tensors (``state_dict=hf_state_dict(model)``)."""
    if state_dict is None:
        raise ValueError(
            f"{type(self).__name__}.save_pretrained would write this rank's weight shards: the layers are split "
            "by parallelize_llama. Call odysseus.integrations.hf.save_pretrained(model, save_directory) on every "
            "rank (it gathers the dense weights; rank 0 writes), or pass state_dict=hf_state_dict(model), "
            "gathered on every rank, to model.save_pretrained on the rank that writes"
        )
    if dist.is_initialized():  # every rank holds the same dense tensors: one writer is enough
        kwargs.setdefault("is_main_process", dist.get_rank() == 0)
    return type(self).save_pretrained(self, save_directory, *args, state_dict=state_dict, **kwargs)


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (Hugging Face's) refuse to write shards (see :func:`_hf_save_pretrained`).

    Raising rather than gathering: callers such as ``Trainer`` save on rank 0 only, where a collective gather
    would wait forever for the other ranks."""
    if callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained = types.MethodType(_hf_save_pretrained, model)  # copies rebind it
