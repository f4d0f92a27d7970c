# Test hook: on rank `fail_rank` it raises (mode 0) or returns a result of the
# wrong shape (mode 1); a mean allreduce elsewhere. For the failure-safety tests.
from typing import Dict, List
from torch import Tensor


def spec() -> Dict[str, List[str]]:
    none: List[str] = []
    return {"replicated": none, "local": none}


def params() -> Dict[str, float]:
    return {"fail_rank": 1.0, "mode": 0.0}


def hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, bucket: Bucket) -> Tensor:
    b = bucket.buffer()
    if group.rank() == int(params["fail_rank"]):
        if params["mode"] == 0.0:
            raise RuntimeError("fail_on_rank: this rank's hook fails")
        return b[:1].clone()
    b.div_(group.world_size())
    return group.allreduce(b)
