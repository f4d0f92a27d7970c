# Mean allreduce: bit-for-bit what c10d's built-in ALLREDUCE hook computes
# (divide by the world size first, then sum across ranks).
from typing import Dict
from torch import Tensor


def hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, bucket: Bucket) -> Tensor:
    buffer = bucket.buffer()
    buffer.div_(group.world_size())
    return group.allreduce(buffer)
