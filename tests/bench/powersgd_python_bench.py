"""Per-bucket time of PyTorch's Python powerSGD_hook (rank 4, warm start, error
feedback) at world size 1, on the buckets ftcomm_bench_hooks --bucket-timing uses,
for comparison with ftcomm's TorchScript powersgd hook.

    python3 tests/bench/powersgd_python_bench.py [cpu|cuda] [gloo|nccl]
"""
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

BUCKETS = [[(1024, 2048), (2048,), (2048, 2048), (2048,)], [(2048, 2048), (2048,), (2048, 1024), (1024,)]]


class Bucket:
    """What powerSGD_hook reads of a c10d GradBucket."""

    def __init__(self, index, count, buffer, shapes):
        self._index, self._count, self._buffer, self._shapes = index, count, buffer, shapes

    def buffer(self):
        return self._buffer

    def index(self):
        return self._index

    def is_last(self):
        return self._index == self._count - 1

    def gradients(self):
        out, at = [], 0
        for shape in self._shapes:
            n = math.prod(shape)
            out.append(self._buffer[at : at + n].view(shape))
            at += n
        return out

    def parameters(self):
        return self.gradients()


def main():
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    backend = sys.argv[2] if len(sys.argv) > 2 else ("nccl" if device == "cuda" else "gloo")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29761")
    dist.init_process_group(backend, rank=0, world_size=1)
    state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2)
    sources = [torch.randn(sum(math.prod(s) for s in shapes), device=device) for shapes in BUCKETS]
    times = [[] for _ in BUCKETS]
    for it in range(25):
        for b, shapes in enumerate(BUCKETS):
            bucket = Bucket(b, len(BUCKETS), sources[b].clone(), shapes)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            powersgd.powerSGD_hook(state, bucket).wait()
            if device == "cuda":
                torch.cuda.synchronize()
            if it >= 5:
                times[b].append((time.perf_counter() - start) * 1000)
    print("powersgd (PyTorch Python hook) per-bucket time on %s, rank 4, median of 20 after 5 warm-up: %s"
          % (device, " ".join("%.3f ms" % statistics.median(t) for t in times)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
