"""Triton kernels of odysseus: a persistent GEMM and the GEMMs fused with all-gather / reduce-scatter.

CPU tensors run through the Triton interpreter (fp16/fp32), CUDA tensors through the compiled kernels.
See docs/KERNELS.md for buffer and flag layouts, the epoch scheme and the timeout record.
"""

from odykernels._chunks import split_rows
from odykernels.ag_matmul import ag_matmul, prepare_ag_matmul
from odykernels.matmul import matmul
from odykernels.matmul_rs import matmul_rs, prepare_matmul_rs, prepare_reduce_slots, reduce_slots
from odykernels.signal import check_status, new_status

__all__ = [
    "ag_matmul",
    "check_status",
    "matmul",
    "matmul_rs",
    "new_status",
    "prepare_ag_matmul",
    "prepare_matmul_rs",
    "prepare_reduce_slots",
    "reduce_slots",
    "split_rows",
]
