# Test hook: rank-local int64 state above 2^53 that changes the result. Each
# bucket keeps a counter starting at 2^60 + 2; the gradient is scaled by
# 1 + (counter mod 3) / 4 before the mean allreduce. A counter that comes back
# from a buddy copy with lost low bits (through float64) scales differently and
# changes the final parameters.
from typing import Dict, List
import torch
from torch import Tensor


def spec() -> Dict[str, List[str]]:
    replicated: List[str] = []
    local: List[str] = ["count"]
    return {"replicated": replicated, "local": local}


def params() -> Dict[str, float]:
    p: Dict[str, float] = {}
    return p


def hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, bucket: Bucket) -> Tensor:
    counts = state["count"]
    index = bucket.index()
    if index not in counts:
        counts[index] = torch.full([1], 1152921504606846978, dtype=torch.int64)
    counts[index].add_(1)
    k = int(counts[index].remainder(3).item())
    b = bucket.buffer()
    b.mul_((1.0 + 0.25 * k) / group.world_size())
    return group.allreduce(b)
