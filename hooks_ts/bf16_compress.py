# BF16 compression, as PyTorch's bf16_compress_hook: the bucket travels as
# bfloat16 (half the bytes), is divided by the world size before the sum, and is
# written back into the bucket's dtype when the sum is done (Work.into).
from typing import Dict
import torch
from torch import Tensor


def hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, bucket: Bucket) -> Work:
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(group.world_size())
    return group.start_allreduce(compressed).into(buffer)
