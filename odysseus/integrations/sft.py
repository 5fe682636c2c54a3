"""TRL's ``SFTTrainer``, sequence-parallel: change the class, add ``sp_size``.

.. code-block:: python

    trainer = OdysseusSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=tokenizer,
                                 sp_size=4)                        # everything else as for trl.SFTTrainer

:class:`OdysseusSFTTrainer` puts :class:`~odysseus.integrations.trainer.OdysseusTrainer` before ``SFTTrainer`` in
the method order: TRL prepares the dataset (formatting, chat templates, tokenization, completion- or
assistant-only labels, truncation, packing) and collates; OdysseusTrainer splits the model and the data, computes
the loss, reduces the gradients and saves. No TRL code is copied or patched. What TRL computes from the whole
logits is not available: its ``entropy`` and ``mean_token_accuracy`` metrics are not logged, and ``loss_type="dft"``
and ``peft_config`` are refused.
"""

from __future__ import annotations

from trl import SFTTrainer

from .trainer import OdysseusTrainer

__all__ = ["OdysseusSFTTrainer"]


class OdysseusSFTTrainer(OdysseusTrainer, SFTTrainer):
    """``trl.SFTTrainer`` with the model split over ``sp_size`` ranks: the arguments of ``SFTTrainer`` (``model``
    a model object, not a name), plus those :class:`OdysseusTrainer` adds (``strategy``, ``sp_size``, ``zero3``,
    the long-sequence options). ``SFTConfig``'s default ``gradient_checkpointing=True`` becomes the layers' own
    recomputation (``checkpoint=True``). Collective: construct on every rank with the same arguments."""

    def __init__(self, model=None, args=None, *trainer_args, **kwargs):
        if kwargs.get("peft_config") is not None:
            raise ValueError("OdysseusSFTTrainer: peft_config is not supported (PEFT would wrap the split layers)")
        if getattr(args, "loss_type", "nll") != "nll":
            raise ValueError(f"OdysseusSFTTrainer: loss_type={args.loss_type!r}; only 'nll' is supported")
        super().__init__(model, args, *trainer_args, **kwargs)
