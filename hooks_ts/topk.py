# Top-k sparsification with error feedback: each rank sends its k largest
# (|value|) entries of gradient + carried error, k = ceil(ratio * numel); what it
# did not send is carried to the next step (rank-local state "error"). Each rank
# sums everyone's sparse entries and divides by the world size.
from typing import Dict, List
import torch
from torch import Tensor


def spec() -> Dict[str, List[str]]:
    local: List[str] = ["error"]
    replicated: List[str] = []
    return {"replicated": replicated, "local": local}


def params() -> Dict[str, float]:
    return {"ratio": 0.01}


def ranges() -> Dict[str, List[float]]:
    # ratio is the fraction of entries sent: above 0, at most all of them.
    return {"ratio": [1e-9, 1.0]}


def hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, bucket: Bucket) -> Tensor:
    buffer = bucket.buffer()
    index = bucket.index()
    errors = state["error"]
    if index in errors and errors[index].numel() == buffer.numel():
        buffer.add_(errors[index])
    n = buffer.numel()
    k = max(1, min(n, int(torch.ceil(torch.tensor(params["ratio"] * n)).item())))
    top = torch.topk(buffer.abs(), k)[1]
    values = buffer.index_select(0, top)
    residual = buffer.clone()
    residual.index_fill_(0, top, 0.0)
    errors[index] = residual
    result = torch.zeros_like(buffer)
    all_values = group.allgather(values)
    all_indices = group.allgather(top)
    for i in range(len(all_values)):
        result.index_add_(0, all_indices[i], all_values[i])
    buffer.copy_(result.div_(group.world_size()))
    return buffer
