# INT8 quantization with one scale per bucket: every rank quantizes with the same
# scale (the largest |gradient| over all ranks / 127), the int8 codes are
# all-gathered (1 byte an element per rank on the wire), and each rank
# dequantizes and averages. Error bound: each element of the mean is within
# scale / 2 of the exact mean, scale = max|g| / 127.
from typing import Dict
import torch
from torch import Tensor


def hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, bucket: Bucket) -> Tensor:
    buffer = bucket.buffer()
    amax = buffer.abs().max().reshape([1]).to(torch.float32)
    scale = torch.stack(group.allgather(amax)).max() / 127.0
    if bool(scale == 0):
        buffer.zero_()
        return buffer
    codes = torch.round(buffer.to(torch.float32) / scale).clamp_(-127, 127).to(torch.int8)
    total = torch.zeros_like(buffer, dtype=torch.float32)
    for c in group.allgather(codes):
        total.add_(c.to(torch.float32))
    buffer.copy_(total.mul_(scale).div_(group.world_size()))
    return buffer
