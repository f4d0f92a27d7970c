# No communication at all: returns the local gradients. For measuring the cost
# of everything but the collective; training with it is not data-parallel.
from typing import Dict, List
from torch import Tensor


def spec() -> Dict[str, List[str]]:
    none: List[str] = []
    return {"replicated": none, "local": none}


def params() -> Dict[str, float]:
    p: Dict[str, float] = {}
    return p


def hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, bucket: Bucket) -> Tensor:
    return bucket.buffer()
