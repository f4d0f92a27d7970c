# Mean allreduce: bit-for-bit what c10d's built-in ALLREDUCE hook computes
# (divide by the world size first, then sum across ranks).
from typing import Dict, List
from torch import Tensor


def spec() -> Dict[str, List[str]]:
    none: List[str] = []
    return {"replicated": none, "local": none}


def params() -> Dict[str, float]:
    p: Dict[str, float] = {}
    return p


def hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, bucket: Bucket) -> Tensor:
    buffer = bucket.buffer()
    buffer.div_(group.world_size())
    return group.allreduce(buffer)
