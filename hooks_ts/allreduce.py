# Mean allreduce: bit-for-bit what c10d's built-in ALLREDUCE hook computes
# (divide by the world size first, then sum across ranks). The hook returns the
# allreduce it started: the bucket is done when the sum is, and the next bucket's
# hook runs meanwhile, as c10d's built-in returns its collective's future.
from typing import Dict
from torch import Tensor


def hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, bucket: Bucket) -> Work:
    buffer = bucket.buffer()
    buffer.div_(group.world_size())
    return group.start_allreduce(buffer)
