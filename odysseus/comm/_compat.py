"""Names of tensor-in/tensor-out collectives across torch releases.

torch 2.13 renamed them (``all_gather_single``); 2.11, on the GPU image, has only the old names.
"""

import torch.distributed as dist

all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
