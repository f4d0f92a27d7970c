# Test hook: never returns on rank `stuck_rank` (every rank when it is negative);
# a mean allreduce elsewhere. For the hook-deadline tests.
from typing import Dict, List
from torch import Tensor


def spec() -> Dict[str, List[str]]:
    none: List[str] = []
    return {"replicated": none, "local": none}


def params() -> Dict[str, float]:
    return {"stuck_rank": -1.0}


def hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, bucket: Bucket) -> Tensor:
    b = bucket.buffer()
    if params["stuck_rank"] < 0 or group.rank() == int(params["stuck_rank"]):
        spins = 0
        while True:
            spins += 1
    b.div_(group.world_size())
    return group.allreduce(b)
