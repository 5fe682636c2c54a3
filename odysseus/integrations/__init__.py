"""Adapters that put odysseus layers into models from other libraries.

- :mod:`odysseus.integrations.hf`: Hugging Face ``transformers`` Llama models (``parallelize_llama``).

Each adapter imports its library on import, so ``import odysseus`` never needs them.
"""
