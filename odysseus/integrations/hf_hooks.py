"""Forward pre-hooks of a ``parallelize_llama`` model: reject the calls its layers would silently ignore.

A KV cache, varlen (flash-attention) arguments, a padding mask, per-layer outputs, Hugging Face gradient
checkpointing, labels for the built-in loss and ``generate()`` all assume the unsplit sequence on every
rank; each raises a ``ValueError`` that says what to do instead, on every rank at once.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..comm.prints import Fingerprinter
from ..comm.verdict import agree, attempt

# Keyword arguments of transformers' flash-attention varlen path, which describe the unsplit sequence.
_VARLEN_ARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
# The layers' private keyword for the positions the model was called with (see _model_call_hook).
_POSITIONS = "odysseus_position_ids"
# Names transformers has used across releases for a layer's KV cache argument.
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
_NO_CACHE = (
    "parallelize_llama models have no KV cache: they run causal attention over the whole (global) sequence "
    "in one call; use them for training and full-sequence scoring, not generate()"
)
_NO_GENERATE = (
    "generate() is not supported on a parallelize_llama model: its layers keep no KV cache, and generate() "
    "feeds the whole growing sequence to every rank at every step, while a sequence-split model takes each "
    "rank's shard and holds the next-token logits on the last rank only. Generate with the unsplit model: "
    "odysseus.integrations.hf.save_pretrained(model, path) on every rank, then "
    "LlamaForCausalLM.from_pretrained(path) on one device"
)


def _positional_names(module: nn.Module) -> list[str]:
    params = inspect.signature(module.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _check_attention_mask(mask) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
        raise ValueError(
            f"attention_mask of shape {shape}: parallelize_llama models take None or an all-ones (batch, seq) "
            "mask; their attention is always causal over the whole sequence"
        )
    if not bool(mask.all()):
        raise ValueError(
            f"attention_mask has {int((mask == 0).sum())} masked (padding) tokens; parallelize_llama models attend "
            "causally to every token, so pass unpadded sequences (or an all-ones mask)"
        )


def _check_call(mod: nn.Module, given: dict, config) -> None:
    """Raise ``ValueError`` for a call of the layers' owner (``LlamaModel``) that the layers would ignore."""
    for key in _CACHE_ARGS:
        if given.get(key) is not None:
            raise ValueError(f"{key} was passed; {_NO_CACHE}")
    if given.get("use_cache"):
        raise ValueError(f"use_cache={given['use_cache']!r}; expected False or None: {_NO_CACHE}")
    for key in _VARLEN_ARGS:
        if given.get(key) is not None:
            raise ValueError(
                f"{key} was passed; parallelize_llama models find packed documents from position_ids alone "
                "(a position 0 starts one), so pass position_ids (this rank's shard of them) and no varlen "
                "arguments (e.g. DataCollatorWithFlattening(return_flash_attn_kwargs=False))"
            )
    _check_attention_mask(given.get("attention_mask"))
    for flag in ("output_attentions", "output_hidden_states"):
        if given.get(flag) or (given.get(flag) is None and getattr(config, flag, False)):
            raise ValueError(f"{flag}=True: parallelize_llama models do not return per-layer {flag[7:]}")
    if getattr(mod, "gradient_checkpointing", False) and mod.training and torch.is_grad_enabled():
        raise ValueError(
            "Hugging Face gradient checkpointing is enabled on the model, but it does not reach the odysseus "
            "layers; disable it (model.activation_checkpointing_disable()) and pass checkpoint=True to "
            "parallelize_llama"
        )


class EntryCheck:
    """The default input check of a ``parallelize_llama`` model: a print (:mod:`odysseus.comm.prints`) of the
    model's inputs, handed to the first decoder layer, whose length exchange compares it across the ranks.

    Sequence-split strategies print ``input_ids`` (or ``inputs_embeds``) alone: position ids may repeat
    across shards (packed documents cut at shard boundaries). ``tp`` prints the ids, ``position_ids`` and the
    labels (stashed by :meth:`labels_hook` on the model that takes them), which must all be the same on
    every rank."""

    HINT = "parallelize_llama checks the inputs by default; check_inputs=False turns it off"

    def __init__(self, replicated: bool):
        self.replicated = replicated
        self.printer = Fingerprinter()
        self.labels: torch.Tensor | None = None

    def labels_hook(self, module: nn.Module):
        names = _positional_names(module)

        def hook(mod, args, kwargs):
            self.labels = {**dict(zip(names, args)), **kwargs}.get("labels")

        return hook

    def hand_over(self, owner: nn.Module, given: dict) -> None:
        """Print ``given``'s inputs for the first odysseus layer under ``owner`` (found at each call, so that a
        ``copy.deepcopy`` of the model, whose hooks are the same functions, checks in its own layer)."""
        ids = given.get("input_ids") if given.get("input_ids") is not None else given.get("inputs_embeds")
        tensors = [ids, given.get("position_ids"), self.labels] if self.replicated else [ids]
        self.labels = None  # this call's: a later call of the owner alone has none
        first = next(m for m in owner.modules() if hasattr(getattr(m, "self_attn", None), "region"))
        first.self_attn.region.given_prints = (self.printer(tensors), self.HINT)


def _model_call_hook(module: nn.Module, config, pg, entry: EntryCheck | None = None):
    """A forward pre-hook for the module that runs the layers (``LlamaModel``): reject what the layers ignore,
    on every rank at once (a padding mask on one rank must not leave the others waiting in the layers); then
    hand the ``entry`` check its inputs (None: not checked)."""
    names = _positional_names(module)

    @torch.compiler.disable  # a host-side exchange of the verdict
    def hook(mod, args, kwargs):
        given = {**dict(zip(names, args)), **kwargs}
        _, error = attempt(lambda: _check_call(mod, given, config))
        agree(error, pg, type(mod).__name__)
        if entry is not None:
            entry.hand_over(mod, given)
        if "use_cache" in names and names.index("use_cache") >= len(args):
            # The config's default (use_cache=True for Llama) would make LlamaModel build a cache for nothing.
            kwargs = {**kwargs, "use_cache": False}
        if given.get("position_ids") is not None:
            # The layers take the positions in the input's layout and gather the whole sequence's themselves.
            # The HF model gets none, so it builds no rotary table or packed-sequence mask for the shard.
            kwargs = {**kwargs, _POSITIONS: given["position_ids"]}
            at = names.index("position_ids") if "position_ids" in names else len(args)
            if at < len(args):
                args = (*args[:at], None, *args[at + 1 :])
            else:
                kwargs["position_ids"] = None
        return args, kwargs

    return hook


def _no_generate(self, *args, **kwargs):
    raise ValueError(_NO_GENERATE)


def _labels_hook(module: nn.Module, strategy: str, world: int):
    names = _positional_names(module)

    def hook(mod, args, kwargs):
        if {**dict(zip(names, args)), **kwargs}.get("labels") is not None:
            raise ValueError(
                f"labels were passed to a {strategy!r} model at world size {world}: Hugging Face's loss would shift "
                "labels within each rank's shard and average per rank; compute the loss with "
                "odysseus.integrations.hf.causal_lm_loss(logits, labels, group) instead"
            )

    return hook
