# FP16 compression: bit-for-bit what c10d's built-in FP16_COMPRESS hook computes.
# The bucket travels as float16 (half the bytes), is divided by the world size in
# float16 before the sum (against overflow), and is written back into the bucket
# when the sum is done (Work.into), while the next bucket's hook runs.
from typing import Dict
import torch
from torch import Tensor


def hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, bucket: Bucket) -> Work:
    buffer = bucket.buffer()
    compressed = buffer.to(torch.float16)
    compressed.div_(group.world_size())
    return group.start_allreduce(compressed).into(buffer)
