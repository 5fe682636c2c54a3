"""The decoder layer :func:`odysseus.integrations.hf.parallelize_llama` puts in a Hugging Face model, the model
families it accepts, and how the other integration modules find the layers of a parallelized model."""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist
from torch import nn

from ..config import TransformerConfig
from ..layout import dense_shapes, has_bias
from ..strategies import registry
from ..strategies.block import ParallelBlock
from .hf_hooks import _CACHE_ARGS, _NO_CACHE, _POSITIONS

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
