"""odysseus: split one Llama-style Transformer layer over N GPUs (TP, TP-SP, Ulysses, Odysseus)."""

from . import reference
from .comm import CommLedger, gather_sequence, shard_sequence
from .comm.failures import PeerFailure, fail_fast
from .config import TransformerConfig
from .overlap import check_overlap
from .strategies.block import ParallelBlock
from .strategies.ffn import TPFFN, TPSPFFN, SeqParallelFFN
from .strategies.head_split import OdysseusAttention, TPAttention, TPSPAttention
from .strategies.ulysses import UlyssesAttention
from .training.clip import clip_grad_norm_, grad_norm
from .training.parallelize import STRATEGIES, parallelize
from .training.state import dense_state_dict, finalize_grads, zero3

__all__ = [
    "STRATEGIES",
    "CommLedger",
    "OdysseusAttention",
    "ParallelBlock",
    "PeerFailure",
    "SeqParallelFFN",
    "TPAttention",
    "TPFFN",
    "TPSPAttention",
    "TPSPFFN",
    "TransformerConfig",
    "UlyssesAttention",
    "check_overlap",
    "clip_grad_norm_",
    "dense_state_dict",
    "fail_fast",
    "finalize_grads",
    "gather_sequence",
    "grad_norm",
    "parallelize",
    "reference",
    "shard_sequence",
    "zero3",
]
