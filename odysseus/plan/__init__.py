"""The planner: exact closed forms of bytes and memory per rank, a time model, calibration, presets.

    python -m odysseus.plan --model llama2-7b --seq 65536 --gpus 8 --hardware h100-nvlink

Modules: :mod:`.case` (:class:`Case`, one rank of one block under one strategy), :mod:`.forms` (exact
bytes moved and kept, checked against real runs), :mod:`.cost` (seconds), :mod:`.predict` (whole-model
memory and the ranking), :mod:`.calibrate` (fit to a ``perf/bench_layer.py`` run), :mod:`.presets`
(hardware, models, assumptions, each value with its source), :mod:`.ring` (the ring dim of a
``("dp", "ring", "sp")`` mesh), :mod:`.efficiency` (attention throughput from published figures), ``__main__``
(the command line).
"""

from .calibrate import Calibration, calibrate, calibration_report
from .case import Case, RankShape, heads_feasible
from .cost import Cost, attention_flops, block_cost, comm_time, model_step
from .efficiency import attention_efficiency
from .forms import (
    Collective,
    Record,
    bytes_per_rank,
    expected_collectives,
    expected_records,
    parameter_bytes,
    strategy_records,
    weight_numel,
    zero3_records,
)
from .longseq import LongSeq, StackPeak, longseq_cost, stack_peak
from .max_seq import MaxSeq, max_seq
from .memory import Peak, block_peak, kept_input_bytes, saved_activation_bytes, saved_parts
from .overlap_memory import symm_workspace_bytes
from .predict import Prediction, memory_bytes, predict
from .presets import HARDWARE, MODELS, Assumptions, Hardware, Model, get_hardware, get_model
from .ring import hop_bytes, load_balance_factor, ring_records, step_pairs

__all__ = [
    "HARDWARE",
    "MODELS",
    "Assumptions",
    "Calibration",
    "Case",
    "Collective",
    "Cost",
    "Hardware",
    "LongSeq",
    "MaxSeq",
    "Model",
    "Peak",
    "Prediction",
    "RankShape",
    "StackPeak",
    "Record",
    "attention_efficiency",
    "attention_flops",
    "block_peak",
    "block_cost",
    "bytes_per_rank",
    "calibrate",
    "calibration_report",
    "comm_time",
    "expected_collectives",
    "expected_records",
    "get_hardware",
    "get_model",
    "heads_feasible",
    "hop_bytes",
    "load_balance_factor",
    "memory_bytes",
    "model_step",
    "parameter_bytes",
    "predict",
    "ring_records",
    "kept_input_bytes",
    "saved_activation_bytes",
    "saved_parts",
    "strategy_records",
    "longseq_cost",
    "max_seq",
    "stack_peak",
    "step_pairs",
    "symm_workspace_bytes",
    "weight_numel",
    "zero3_records",
]
