"""Sequence parallelism from Hugging Face ``Trainer``: change the class, add ``sp_size``.

.. code-block:: python

    trainer = OdysseusTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                              strategy="odysseus", sp_size=4)    # everything else as for transformers.Trainer
    trainer.train()                                              # torchrun --nproc-per-node 8 train.py

The ``world / (ring_size * sp_size)`` data-parallel replicas each run the model split over ``ring_size *
sp_size`` ranks (:func:`~odysseus.integrations.hf.parallelize_llama` on a ``(dp, sp)`` mesh, or ``(dp, ring, sp)``
with a ring, dp-major). The job as a whole trains
on what one device trains on in the dense single-process run: ``per_device_train_batch_size`` sequences per
micro-step, split over the dp replicas (so it must be a multiple of dp), every rank of a replica reading the
same sequences and feeding its shard of the tokens. Logged losses, gradient norms and weights are the dense
run's, and ``evaluate()`` reports the dense model's loss. What it cannot honour is refused on every rank (see
:func:`check_training_args`): among others ``predict()`` and ``compute_metrics``, which need logits.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist
import transformers
from torch import nn

from ..comm import primitives, shard_sequence
from ..comm.groups import group_rank, group_size
from ..comm.verdict import agree, attempt
from ..layout import offsets, shard_sizes
from ..strategies import registry
from ..training.clip import clip_grad_norm_
from ..training.clip import grad_norm as dense_grad_norm
from ..training.state import zero3 as shard_zero3
from .hf import parallelize_llama
from .hf_state import finalize_model_grads, hf_state_dict
from .loss import causal_lm_loss, lm_head_loss
from .trainer_args import check_training_args, job_mesh, take_hf_checkpointing, world_size
from .trainer_state import load_dense, load_optimizer, save_layout, save_optimizer

__all__ = ["OdysseusTrainer", "check_training_args"]

IGNORE_INDEX = -100  # transformers' label for "no loss here"
_BATCH_KEYS = ("input_ids", "labels", "position_ids", "attention_mask")
# What padding-free collators (TRL's) add for flash-attention's varlen kernels: the documents that position_ids
# already mark, which is all the layers read. Dropped where position_ids come with them.
_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


class ReplicaShare:
    """A collator for one data-parallel replica: of a batch's examples it keeps the replica's contiguous share
    (equal shares of a full batch; a short last batch is shared out as evenly as it goes), then collates them
    with ``collate``. Every replica sees the same batch, so a batch too small to share fails on every rank."""

    def __init__(self, collate, replica: int, replicas: int):
        self.collate, self.replica, self.replicas = collate, replica, replicas

    def __call__(self, features: list):
        sizes = shard_sizes(len(features), self.replicas)
        if min(sizes) == 0:
            raise ValueError(
                f"OdysseusTrainer: a batch of {len(features)} examples cannot give each of the {self.replicas} "
                "data-parallel replicas one (the epoch's last batch?): pass dataloader_drop_last=True"
            )
        start = offsets(sizes)[self.replica]
        return self.collate(features[start : start + sizes[self.replica]])


class OdysseusTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose model runs split over ``sp_size`` ranks by an odysseus strategy.

    Takes every argument of ``Trainer`` (``model`` must be a Llama, Qwen2 or Mistral causal LM, fp32 or bf16,
    with its pretrained or fresh weights; ``model_init`` is not supported) and: ``strategy`` (one of
    :data:`odysseus.STRATEGIES`); ``sp_size`` (ranks of the head-parallel ``sp`` group, default every rank of a
    replica); ``ring_size`` (ring attention's degree around the ``sp`` groups, default 1: no ring; README "Past
    the head count, across nodes"); the world size must be a multiple of ``ring_size * sp_size``;
    ``zero3`` (shard the layers' replicated weights with :func:`odysseus.zero3`, ``shard`` as there); the
    long-sequence options ``checkpoint``, ``offload``, ``ffn_tile``, ``save_input`` and ``backend`` of
    :func:`parallelize_llama`; ``loss_chunk`` (LM head and loss that many tokens at a time, see
    :func:`~odysseus.integrations.hf.lm_head_loss`). Collective: construct on every rank with the same arguments.

    Batches hold ``input_ids`` and ``labels`` (``(batch, seq)``; -100 where no loss is wanted), optionally
    ``position_ids`` (packed sequences, e.g. ``DataCollatorWithFlattening``) and an all-ones ``attention_mask``.
    Checkpoints hold the dense model (``from_pretrained`` loads it on one device) and every rank's optimizer
    state; resuming needs the same world size, ``ring_size``, ``sp_size`` and strategy.
    """

    # compute_loss divides by the target tokens of the whole accumulation window, as the dense Trainer does.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | None = None,
        args: transformers.TrainingArguments | None = None,
        *trainer_args,
        strategy: str = "odysseus",
        sp_size: int | None = None,
        ring_size: int = 1,
        zero3: bool = False,
        shard: str | None = None,
        checkpoint: bool = False,
        offload: bool = False,
        ffn_tile: int | None = None,
        save_input: str = "gathered",
        backend: str = "auto",
        loss_chunk: int | None = None,
        **trainer_kwargs,
    ):
        args = args if args is not None else transformers.TrainingArguments(output_dir="tmp_trainer")
        checkpoint = take_hf_checkpointing(args) or checkpoint
        check_training_args(args)
        if model is None or trainer_kwargs.get("model_init") is not None:
            raise ValueError("OdysseusTrainer needs model=; model_init is not supported (the model is split once)")
        for name in ("compute_loss_func", "compute_metrics", "preprocess_logits_for_metrics"):
            if trainer_kwargs.get(name) is not None:  # each needs the logits, which no rank holds whole
                raise ValueError(f"OdysseusTrainer computes the loss itself, without logits; {name} is not supported")
        self.spec = registry.get(strategy)
        device = args.device  # accelerate joins the launched ranks into one process group here
        world = world_size()
        if not isinstance(ring_size, int) or ring_size < 1 or world % ring_size:
            raise ValueError(f"OdysseusTrainer: ring_size={ring_size!r}; expected a divisor of the world size {world}")
        sp = world // ring_size if sp_size is None else sp_size
        if not isinstance(sp, int) or sp < 1 or world % (ring_size * sp):
            raise ValueError(
                f"OdysseusTrainer: sp_size={sp_size!r} with ring_size={ring_size}; expected ring_size * sp_size to "
                f"divide the world size {world}"
            )
        dp = world // (ring_size * sp)
        self.ring_size = ring_size
        if args.per_device_train_batch_size % dp:
            raise ValueError(
                f"OdysseusTrainer: per_device_train_batch_size={args.per_device_train_batch_size} sequences per step "
                f"cannot be split over the {dp} data-parallel replicas of world {world} with sp_size={sp}: pass a "
                f"multiple of {dp} (each replica trains on per_device_train_batch_size / {dp} of them)"
            )
        self.mesh = job_mesh(device, dp, ring_size, sp) if world > 1 else None
        # What a replica's sequence is split over, for the loss: the sp group, or the (ring, sp) sub-mesh whose
        # layout the ring's ranks hold their tokens in; sliced once here, not per micro-batch.
        ring_mesh = self.mesh is not None and ring_size > 1
        self.seq_group = self.mesh["ring", "sp"] if ring_mesh else self.sp_group
        model.to(device)
        with torch.random.fork_rng(devices=[]):  # Trainer's data order must not depend on what splitting draws
            parallelize_llama(
                model, strategy, self.mesh, backend=backend, save_input=save_input,
                checkpoint=checkpoint, offload=offload, ffn_tile=ffn_tile,
            )  # fmt: skip
            if zero3:
                shard_zero3(model, shard=shard)
        self.loss_chunk = loss_chunk
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:  # configured by `accelerate launch`, not the args
            raise ValueError("OdysseusTrainer: accelerate is configured for DeepSpeed or FSDP; launch with torchrun")
        if isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            raise ValueError("OdysseusTrainer: an IterableDataset train_dataset is not supported; pass a map-style one")

    # --- the mesh ------------------------------------------------------------------------------

    @property
    def sp_group(self):
        """The ``sp`` process group of the layers' head-parallel part (None on one process)."""
        return None if self.mesh is None else self.mesh.get_group("sp")

    def _dp(self) -> tuple[int, int]:
        """(this rank's replica, number of replicas)."""
        if self.mesh is None:
            return 0, 1
        dp = self.mesh.get_group("dp")
        return group_rank(dp), group_size(dp)

    def get_total_train_batch_size(self, args: transformers.TrainingArguments) -> int:
        """Sequences per optimizer step: the replicas split one device's batch, they do not multiply it."""
        return self._train_batch_size * args.gradient_accumulation_steps

    # --- data ----------------------------------------------------------------------------------

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """Trainer's loader (sampler, seed, resume skip as in the dense run) without accelerate's per-process
        split: every rank reads every batch of ``per_device_train_batch_size`` examples, and the collator keeps
        this replica's contiguous share before collating (so a packing collator packs the share)."""
        return self._per_replica(super().get_train_dataloader)

    def get_eval_dataloader(self, eval_dataset=None) -> torch.utils.data.DataLoader:
        """As :meth:`get_train_dataloader`, for batches of ``per_device_eval_batch_size`` examples."""
        return self._per_replica(functools.partial(super().get_eval_dataloader, eval_dataset))

    def _per_replica(self, make) -> torch.utils.data.DataLoader:
        if self.mesh is None:
            return make()
        user = self.data_collator
        self.data_collator = ReplicaShare(user, *self._dp())  # what Trainer's loaders collate with
        try:
            loader = make()
        finally:
            self.data_collator = user
        shard = getattr(loader, "batch_sampler", None)
        if not hasattr(shard, "num_processes"):
            raise TypeError(f"OdysseusTrainer: expected accelerate's BatchSamplerShard, got {type(shard).__name__}")
        # One process's view, as Trainer makes for its own rank-aware BatchRebalanceSampler; a short last batch
        # stays short, as in the dense run (the collator shares it out unevenly).
        shard.num_processes, shard.process_index, shard.even_batches = 1, 0, False
        return loader

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The next ``num_batches`` micro-batches and the target tokens (labels after the first position, not
        -100) in all of them over every replica: the mean loss's denominator."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        return batches, self._targets(batches)

    def _targets(self, batches: list[dict]) -> torch.Tensor:
        """Target tokens (labels after a row's first position, not -100) in ``batches`` over every replica."""
        count = torch.zeros((), dtype=torch.int64, device=self.args.device)  # NCCL reduces device tensors only
        for batch in batches:
            if "labels" not in batch:
                raise ValueError(
                    f"OdysseusTrainer: the batch holds {sorted(batch)} but no labels; use a collator that adds "
                    "them (e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False) or DataCollatorWithFlattening)"
                )
            count += (batch["labels"][..., 1:] != IGNORE_INDEX).sum().to(count.device)
        if self._dp()[1] > 1:
            count = primitives.all_reduce(count, self.mesh.get_group("dp"), category="metadata", label="token count")
        return count

    def _shard(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(this rank's input_ids, position_ids, the replica's full labels), after checking the batch on every
        rank at once (the replicas' batches differ, so one may fail alone)."""

        def check():
            extra = sorted(set(inputs) - set(_BATCH_KEYS) - set(_VARLEN_KEYS if "position_ids" in inputs else ()))
            if extra:
                raise ValueError(
                    f"OdysseusTrainer: the batch holds {extra}; expected only {list(_BATCH_KEYS)} (and "
                    "flash-attention's varlen arguments beside position_ids)"
                )
            mask = inputs.get("attention_mask")
            if mask is not None and not bool(mask.all()):
                raise ValueError(
                    f"OdysseusTrainer: attention_mask holds {int((mask == 0).sum())} padding tokens; the split model "
                    "attends to every token: pack sequences (DataCollatorWithFlattening) or use equal lengths"
                )
            if inputs["input_ids"].shape != inputs["labels"].shape:
                raise ValueError(
                    f"OdysseusTrainer: input_ids {tuple(inputs['input_ids'].shape)} and labels "
                    f"{tuple(inputs['labels'].shape)} differ in shape; expected both (batch, seq)"
                )

        _, error = attempt(check)
        agree(error, dist.group.WORLD if self.mesh is not None else None, "OdysseusTrainer batch")
        ids, positions = inputs["input_ids"], inputs.get("position_ids")
        if self.spec.sequence_split and self.mesh is not None:
            ids = shard_sequence(ids, self.mesh)
            positions = None if positions is None else shard_sequence(positions, self.mesh)
        return ids, positions, inputs["labels"]

    # --- loss and gradients --------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """This rank's term of the window's mean loss: the sum of the terms over every rank and micro-batch is
        the dense model's mean over all target tokens of the window (``num_items_in_batch``)."""
        if return_outputs:
            raise NotImplementedError("OdysseusTrainer does not return model outputs (logits); it computes the loss")
        ids, positions, labels = self._shard(inputs)
        group = self.seq_group
        with self.accelerator.autocast():
            if self.loss_chunk:
                base = self.accelerator.unwrap_model(model).base_model
                hidden = base(input_ids=ids, position_ids=positions).last_hidden_state
                head = self.model.get_output_embeddings()
                loss = lm_head_loss(hidden, head, labels, group, chunk=self.loss_chunk, ignore_index=IGNORE_INDEX)
            else:
                logits = model(input_ids=ids, position_ids=positions).logits
                loss = causal_lm_loss(logits, labels, group, ignore_index=IGNORE_INDEX)
        # The library's loss divides by this replica's micro-batch targets; rescale to the whole window's.
        mine = (labels[:, 1:] != IGNORE_INDEX).sum().clamp_min(1)
        return loss * (mine / torch.as_tensor(num_items_in_batch).clamp_min(1))

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Trainer's step; after the last micro-batch of the window, :func:`finalize_model_grads` makes every
        gradient the dense model's (summed over sp, then once over dp). Returns the term scaled so that Trainer's
        mean over all ranks is the global loss."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            finalize_model_grads(self.model)
        world = dist.get_world_size() if self.mesh is not None else 1
        # Sequence-split ranks hold shares of the loss; "tp" ranks of a replica hold its whole term.
        return loss * (world if self.spec.sequence_split else self._dp()[1])

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the batch's mean loss over every replica's examples, as the dense model's loss, the same on
        every rank; no logits (``predict()`` and ``compute_metrics`` are not supported)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            term = self.compute_loss(model, inputs, num_items_in_batch=self._targets([inputs]))
        if self.mesh is None:
            return term.detach(), None, None
        total = primitives.all_reduce(term.detach(), dist.group.WORLD, category="metadata", label="eval loss")
        # Sequence-split ranks hold shares of the loss; "tp" ranks of a replica each hold its whole term.
        return total / (1 if self.spec.sequence_split else group_size(self.sp_group)), None, None

    def _wrap_model(self, model, training=True, dataloader=None):
        """No DDP: the model sums its own gradients (finalize_model_grads); DDP would sum them again over every
        rank. ``prepare_model(evaluation_mode=True)`` gives everything else accelerate adds (bf16 autocast from
        TrainingArguments) and marks the model prepared, so Trainer's later ``accelerator.prepare(model,
        optimizer)`` leaves it unwrapped."""
        return self.accelerator.prepare_model(model, device_placement=False, evaluation_mode=True)

    def _clip_grad_norm(self, model) -> torch.Tensor:
        """Where Trainer clips: the dense model's norm (odysseus.clip_grad_norm_), the same on every rank."""
        return clip_grad_norm_(self.model, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        """The logged norm: the clipped step's, else the dense model's norm (no clipping)."""
        return dense_grad_norm(self.model) if grad_norm is None else grad_norm

    # --- checkpoints ---------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the dense model (``from_pretrained`` loads it on one device): every rank gathers, rank 0 writes."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state = hf_state_dict(self.model)  # collective
        self._save(output_dir, state_dict=state)
        if self.mesh is not None:
            dist.barrier()  # the files exist before any rank goes on (and, say, loads them)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        save_optimizer(self.optimizer, output_dir, self.args.process_index)
        if self.args.should_save:
            save_layout(output_dir, self._layout())
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, transformers.trainer.SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The dense weights of any checkpoint of this model (ours or a dense Trainer's), each rank its share."""
        load_dense(self.model, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        rank = self.args.process_index
        if checkpoint is None or not load_optimizer(self.optimizer, checkpoint, rank, self._layout()):
            return  # no optimizer state saved (save_only_model): Trainer starts afresh too
        path = os.path.join(checkpoint, transformers.trainer.SCHEDULER_NAME)
        self.lr_scheduler.load_state_dict(torch.load(path, weights_only=True))

    def _layout(self) -> dict:
        """What a checkpoint's optimizer shards depend on: a resume must match it."""
        world = dist.get_world_size() if self.mesh is not None else 1
        return {"strategy": self.spec.name, "world": world, "dp": self._dp()[1], "ring": self.ring_size}

    def predict(self, *args, **kwargs):
        raise NotImplementedError("OdysseusTrainer does not predict; save the model and run it dense")
