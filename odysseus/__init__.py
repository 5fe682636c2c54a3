"""odysseus: split one Llama-style Transformer layer over N GPUs (TP, TP-SP, Ulysses, Odysseus)."""

from . import reference
from .comm import CommLedger, gather_sequence, shard_sequence
from .config import TransformerConfig

__all__ = ["CommLedger", "TransformerConfig", "gather_sequence", "reference", "shard_sequence"]
