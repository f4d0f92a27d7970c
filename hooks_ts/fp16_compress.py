# FP16 compression: bit-for-bit what c10d's built-in FP16_COMPRESS hook computes.
# Like the built-in, it rounds each gradient to fp16 precision, divides by the
# world size and sums in the bucket's dtype; the rounding, not the wire, is fp16.
from typing import Dict, List
import torch
from torch import Tensor


def spec() -> Dict[str, List[str]]:
    none: List[str] = []
    return {"replicated": none, "local": none}


def params() -> Dict[str, float]:
    p: Dict[str, float] = {}
    return p


def hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, bucket: Bucket) -> Tensor:
    buffer = bucket.buffer()
    buffer.copy_(buffer.to(torch.float16))
    buffer.div_(group.world_size())
    group.allreduce(buffer)
    return buffer
