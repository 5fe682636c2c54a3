"""Hugging Face Llama-style models (Llama, Qwen2, Mistral) with every decoder layer split by an odysseus strategy.

.. code-block:: python

    model = LlamaForCausalLM.from_pretrained(path)          # or LlamaForCausalLM(config)
    parallelize_llama(model, "odysseus")                     # in place (also returns the model)
    logits = model(odysseus.shard_sequence(input_ids)).logits  # (batch, seq_local, vocab); "tp": full input_ids
    loss = causal_lm_loss(logits, input_ids)                 # this rank's term of the global mean loss
    loss.backward()
    finalize_model_grads(model)                              # gradients now equal the unsplit model's
    save_pretrained(model, "ckpt/")                          # loadable by LlamaForCausalLM.from_pretrained

Every ``LlamaDecoderLayer`` (``Qwen2DecoderLayer``, ``MistralDecoderLayer``) is replaced by a
:class:`ParallelLlamaDecoderLayer` holding this rank's share of the same weights (and biases) under the same
names; the embeddings, the final norm and the LM head stay replicated. For ``"tp"`` every rank is fed the
full sequence; for ``"tp-sp"``, ``"ulysses"`` and ``"odysseus"`` its :func:`odysseus.shard_sequence` shard.
The layers run causal attention over the global sequence at the true global positions, or at the
``position_ids`` passed to the model (in the input's layout: the shard's, for sequence-split strategies);
positions that restart at 0 start a new packed document, which no token attends across. The causal mask
and rotary table that the HF model builds for the local shard are not used. Hence: no KV cache (training
and full-sequence scoring only), no padding masks, no attention weights or per-layer hidden states in the
output; each of these raises a ``ValueError`` that says so.

Loss convention (sequence-split strategies): the global loss is the sum of the ranks' local losses, and
weights that see only local tokens (embeddings, final norm, LM head, and the replicated weights inside the
layers) have their gradients summed over ranks by :func:`finalize_model_grads`.
"""

from __future__ import annotations

import inspect
import types

import torch
from torch import nn

from ..comm.groups import group_size
from ..comm.mesh import resolve_mesh
from ..comm.weights import check_same_weights, whole_model_group
from ..strategies import registry
from .hf_hooks import EntryCheck, _labels_hook, _model_call_hook, _no_generate
from .hf_layer import DECODER_LAYERS, ParallelLlamaDecoderLayer, _layer_keys, check_llama_config, layers
from .hf_state import finalize_model_grads, guard_save_pretrained, hf_state_dict, save_pretrained
from .loss import causal_lm_loss, global_loss, lm_head_loss, model_loss, shift_labels_for_shard

__all__ = [
    "DECODER_LAYERS",
    "ParallelLlamaDecoderLayer",
    "causal_lm_loss",
    "check_llama_config",
    "finalize_model_grads",
    "global_loss",
    "hf_state_dict",
    "lm_head_loss",
    "model_loss",
    "parallelize_llama",
    "save_pretrained",
    "shift_labels_for_shard",
]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module whose forward calls the layer ``name``: its nearest ancestor that is not a container."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        ancestor = model.get_submodule(".".join(parts[:cut]))
        if not isinstance(ancestor, (nn.ModuleList, nn.ModuleDict)):
            return ancestor, ".".join(parts[:cut])
    return model, ""


def parallelize_llama(
    model: nn.Module,
    strategy: str,
    group=None,
    backend: str = "auto",
    *,
    check_inputs: bool | None = None,
    check_weights: bool = True,
    save_input: str = "gathered",
    checkpoint: bool = False,
    offload: bool = False,
    ffn_tile: int | None = None,
) -> nn.Module:
    """Split every decoder layer of ``model`` over ``group`` with ``strategy``, in place; returns ``model``.

    ``model``: a ``transformers`` ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``, their base
    models, or any module built from their decoder layers (:data:`DECODER_LAYERS`), with its weights
    (pretrained or fresh) on any device and dtype; the layers keep them. ``strategy``: one of
    :data:`odysseus.STRATEGIES`. ``group``, ``backend``, ``save_input``, ``checkpoint`` (each layer keeps only its
    input and recomputes the rest in backward), ``offload`` (those inputs wait in host memory) and ``ffn_tile``:
    see :func:`odysseus.parallelize` (on a 2-D (dp, sp) mesh :func:`finalize_model_grads` sums over dp).
    ``check_inputs`` (see :func:`odysseus.parallelize`): by default (None) each forward compares a fingerprint
    of the model's inputs across the ranks, inside the first layer's length exchange, so that the full
    ``input_ids`` fed to every rank of a sequence-split model, or different ``input_ids``, ``position_ids`` or
    ``labels`` on the ranks of a ``"tp"`` one, raise on every rank; ``True`` also compares every layer's
    input, ``False`` nothing. ``check_weights`` (default True) compares a fingerprint of every weight of
    ``model`` across the ranks once, here, and raises naming the first that differs; ``False`` skips it.
    Collective: call on every rank with the same weights. Frozen weights (``requires_grad=False``) stay
    frozen in the layers.

    Afterwards feed ``input_ids: (batch, seq)`` for ``"tp"`` and their :func:`odysseus.shard_sequence` shard
    ``(batch, seq_local)`` otherwise, and ``position_ids`` (packed sequences) in the same layout; outputs
    (hidden states, logits) have the input's layout. Calls with a KV cache, ``use_cache=True``, a padding
    mask, flash-attention varlen arguments, ``output_attentions`` or ``output_hidden_states`` raise
    ``ValueError``, as does ``labels`` for a sequence-split strategy on more than one rank (use
    :func:`causal_lm_loss`), and a forward whose sequence is longer than a layer's sliding window.
    ``model.generate`` raises ``ValueError`` with the reason; HF's ``model.save_pretrained`` raises unless
    given ``state_dict=hf_state_dict(model)`` (use :func:`save_pretrained`), as it would write this rank's
    shards. ``copy.deepcopy(model)`` shares the group.
    """
    spec = registry.get(strategy)
    pg = resolve_mesh(group).seq  # every rank holding part of the sequence: the verdicts of the calls agree over it
    if isinstance(model, (*DECODER_LAYERS, ParallelLlamaDecoderLayer)):
        raise TypeError("pass the model that holds the decoder layers (e.g. LlamaForCausalLM), not a single layer")
    if layers(model):
        raise ValueError(f"{type(model).__name__} is already parallelized; parallelize_llama a fresh model")
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, DECODER_LAYERS)]
    if not found:
        names = ", ".join(cls.__name__ for cls in DECODER_LAYERS)
        raise TypeError(f"{type(model).__name__} holds no transformers decoder layer ({names}); nothing to parallelize")
    for cls in {type(m) for _, m in found}:
        returns = inspect.signature(cls.forward).return_annotation
        if returns is not torch.Tensor:
            import transformers

            raise NotImplementedError(
                f"transformers {transformers.__version__}: {cls.__name__}.forward returns {returns}, but "
                "parallelize_llama drives models whose decoder layers return a torch.Tensor (as in transformers 5)"
            )
    hf_config = getattr(model, "config", None) or found[0][1].self_attn.config
    check_llama_config(hf_config)
    if any(m.gradient_checkpointing for _, m in found):
        raise ValueError(
            "Hugging Face gradient checkpointing is enabled, but it does not reach the odysseus layers; disable it "
            "(model.activation_checkpointing_disable()) and pass checkpoint=True to parallelize_llama"
        )

    if check_weights:
        check_same_weights(model.named_parameters(), whole_model_group(group), "parallelize_llama")

    owners = {}
    for name, layer in found:
        config = check_llama_config(hf_config, getattr(layer.self_attn, "layer_idx", None))
        weights = layer.state_dict(keep_vars=True)  # parameters, so that requires_grad carries over
        if set(weights) != _layer_keys(config):
            raise ValueError(
                f"{name} holds weights {sorted(weights)}; with its config's biases odysseus expects "
                f"{sorted(_layer_keys(config))}"
            )
        parent_name, _, child = name.rpartition(".")
        new = ParallelLlamaDecoderLayer(
            config, strategy, group, weights=weights, backend=backend, check_inputs=bool(check_inputs),
            save_input=save_input, checkpoint=checkpoint, offload=offload, ffn_tile=ffn_tile,
        )  # fmt: skip
        model.get_submodule(parent_name).register_module(child, new)
        owner, owner_name = _owner(model, name)
        owners[owner_name] = owner
    entry = None if check_inputs is False else EntryCheck(replicated=not spec.sequence_split)
    for owner in owners.values():
        owner.register_forward_pre_hook(_model_call_hook(owner, hf_config, pg, entry), with_kwargs=True)
    if entry is not None and entry.replicated and model not in owners.values():
        if "labels" in inspect.signature(model.forward).parameters:
            model.register_forward_pre_hook(entry.labels_hook(model), with_kwargs=True)
    world = group_size(pg)
    if spec.sequence_split and world > 1 and "labels" in inspect.signature(model.forward).parameters:
        model.register_forward_pre_hook(_labels_hook(model, strategy, world), with_kwargs=True)
    if callable(getattr(model, "generate", None)):
        model.generate = types.MethodType(_no_generate, model)  # an instance attribute: copies rebind it
    guard_save_pretrained(model)
    return model
