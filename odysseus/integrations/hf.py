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

import importlib
import inspect
import types

import torch
import torch.distributed as dist
from torch import nn

from ..comm.groups import group_size, resolve_group
from ..config import TransformerConfig
from ..layout import dense_shapes, has_bias
from ..strategies import registry
from ..strategies.block import ParallelBlock
from .hf_hooks import _CACHE_ARGS, _NO_CACHE, _POSITIONS, _labels_hook, _model_call_hook, _no_generate

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

# Decoder layers parallelize_llama replaces, by (transformers module, class): Llama-style blocks that differ
# only in what TransformerConfig describes (biases, sliding window).
_LAYER_CLASSES = (
    ("llama.modeling_llama", "LlamaDecoderLayer"),
    ("qwen2.modeling_qwen2", "Qwen2DecoderLayer"),
    ("mistral.modeling_mistral", "MistralDecoderLayer"),
)
DECODER_LAYERS: tuple[type, ...] = tuple(
    getattr(importlib.import_module(f"transformers.models.{module}"), name) for module, name in _LAYER_CLASSES
)


def check_llama_config(hf_config, layer_idx: int | None = None) -> TransformerConfig:
    """The :class:`odysseus.TransformerConfig` of a ``transformers`` Llama, Qwen2 or Mistral config (for decoder
    layer ``layer_idx``: its sliding window), after checking that every setting the odysseus layers would
    silently ignore is at its plain value.

    Supported: RoPE ``default``, ``linear``, ``llama3``, ``yarn``, ``longrope``; attention and MLP biases;
    ``head_dim != hidden_size / num_attention_heads``; a sliding window (each forward checks that it covers
    the sequence). Raises ``ValueError`` naming each unsupported field, its value and the supported one: other
    RoPE types, partial rotary, an activation other than ``silu``, attention dropout, ``pretraining_tp > 1``,
    non-causal attention.
    """
    problems = []
    for field, supported in (
        ("hidden_act", "silu"),
        ("attention_dropout", 0.0),
        ("pretraining_tp", 1),
        ("is_causal", True),
    ):
        value = getattr(hf_config, field, supported)
        if value != supported:
            problems.append(f"{field}={value!r}; expected {supported!r}")
    try:
        config = TransformerConfig.from_hf(hf_config, layer_idx)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError(f"parallelize_llama cannot run this {type(hf_config).__name__}: " + "; ".join(problems))
    return config


def _layer_keys(config: TransformerConfig) -> set[str]:
    """The parameter names of a decoder layer with ``config``'s shapes and biases."""
    keys = {"input_layernorm.weight", "post_attention_layernorm.weight"}
    for name in dense_shapes(config):
        prefix = "self_attn" if name[0] in "qkvo" else "mlp"
        keys.add(f"{prefix}.{name}.weight")
        if has_bias(config, name):
            keys.add(f"{prefix}.{name}.bias")
    return keys


class ParallelLlamaDecoderLayer(ParallelBlock):
    """An :class:`odysseus.ParallelBlock` called the way ``LlamaModel`` calls a ``LlamaDecoderLayer``.

    ``forward(hidden_states, **kwargs) -> Tensor`` with ``hidden_states: (batch, seq_local, hidden)`` (the full
    ``(batch, seq, hidden)`` for ``"tp"``). Parameter names are the Hugging Face layer's. The keyword arguments
    ``LlamaModel`` passes (``attention_mask``, ``position_ids``, ``position_embeddings``, ``cache_position``)
    describe the local shard and are ignored: the block computes causal attention over the global sequence
    at the true global positions, or at the positions the model was called with, which the model's hook
    hands over as ``odysseus_position_ids``. A KV cache or a request for attention weights raises ``ValueError``.
    """

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        for key in _CACHE_ARGS:
            if kwargs.get(key) is not None:
                raise ValueError(f"{key} was passed to a decoder layer; {_NO_CACHE}")
        if kwargs.get("use_cache"):
            raise ValueError(f"use_cache={kwargs['use_cache']!r}; expected False: {_NO_CACHE}")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions=True: the odysseus layers do not materialise attention weights")
        return super().forward(hidden_states, kwargs.get(_POSITIONS))


def layers(model: nn.Module) -> list[ParallelLlamaDecoderLayer]:
    """The odysseus decoder layers of a :func:`parallelize_llama` model."""
    return [m for m in model.modules() if isinstance(m, ParallelLlamaDecoderLayer)]


def model_setup(model: nn.Module) -> tuple[registry.StrategySpec, dist.ProcessGroup | None]:
    """(strategy spec, process group) of a model parallelized by :func:`parallelize_llama`."""
    found = layers(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no ParallelLlamaDecoderLayer; call parallelize_llama first")
    setups = {(layer.spec, layer.pg) for layer in found}
    if len(setups) != 1:
        pairs = {(spec.name, pg) for spec, pg in setups}
        raise ValueError(f"the layers of {type(model).__name__} use different (strategy, group) pairs: {pairs}")
    return setups.pop()


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
    check_inputs: bool = False,
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
    ``check_inputs=True`` makes every layer compare the ranks' inputs (see :func:`odysseus.parallelize`): the
    full ``input_ids`` fed to every rank of a sequence-split model then raises on every rank. Collective: call
    on every rank with the same weights.

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
    pg = resolve_group(group)
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

    owners = {}
    for name, layer in found:
        config = check_llama_config(hf_config, getattr(layer.self_attn, "layer_idx", None))
        weights = layer.state_dict()
        if set(weights) != _layer_keys(config):
            raise ValueError(
                f"{name} holds weights {sorted(weights)}; with its config's biases odysseus expects "
                f"{sorted(_layer_keys(config))}"
            )
        parent_name, _, child = name.rpartition(".")
        new = ParallelLlamaDecoderLayer(
            config, strategy, group, weights=weights, backend=backend, check_inputs=check_inputs,
            save_input=save_input, checkpoint=checkpoint, offload=offload, ffn_tile=ffn_tile,
        )  # fmt: skip
        model.get_submodule(parent_name).register_module(child, new)
        owner, owner_name = _owner(model, name)
        owners[owner_name] = owner
    for owner in owners.values():
        owner.register_forward_pre_hook(_model_call_hook(owner, hf_config, pg), with_kwargs=True)
    world = group_size(pg)
    if spec.sequence_split and world > 1 and "labels" in inspect.signature(model.forward).parameters:
        model.register_forward_pre_hook(_labels_hook(model, strategy, world), with_kwargs=True)
    if callable(getattr(model, "generate", None)):
        model.generate = types.MethodType(_no_generate, model)  # an instance attribute: copies rebind it
    guard_save_pretrained(model)
    return model


# The loss and the checkpoint helpers live beside this module; they are part of this module's interface.
from .hf_state import finalize_model_grads, guard_save_pretrained, hf_state_dict, save_pretrained  # noqa: E402
from .loss import causal_lm_loss, global_loss, lm_head_loss, model_loss, shift_labels_for_shard  # noqa: E402
