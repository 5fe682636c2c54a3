"""Adapters that put odysseus layers into models from other libraries.

- :mod:`odysseus.integrations.hf`: Hugging Face ``transformers`` Llama models (``parallelize_llama``).
- :mod:`odysseus.integrations.trainer`: ``transformers.Trainer`` with the model split (``OdysseusTrainer``).
- :mod:`odysseus.integrations.sft`: TRL's ``SFTTrainer`` the same way (``OdysseusSFTTrainer``).

Each adapter imports its library on import, so ``import odysseus`` never needs them.
"""
