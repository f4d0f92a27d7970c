"""A minimal DDP-style job under torchrun --max-restarts: a process group, a few
allreduces, and (on the first attempt) rank 1 SIGKILLed. --init plain uses
torch.distributed.init_process_group("gloo"); --init ftcomm uses
ftcomm.init_process_group(). Prints "probe: attempt N ok" on success."""
import argparse
import os
import signal
import time
from datetime import timedelta

import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--init", choices=["plain", "ftcomm"], required=True)
a = p.parse_args()
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
t0 = time.time()
if a.init == "plain":
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
else:
    import ftcomm
    ftcomm.init_process_group(timeout=60)
rank = dist.get_rank()
for i in range(5):
    t = torch.ones(1000)
    dist.all_reduce(t)
    assert t[0].item() == dist.get_world_size()
    if attempt == 0 and rank == 1 and i == 2:
        os.kill(os.getpid(), signal.SIGKILL)
if rank == 0:
    print(f"probe: attempt {attempt} ok ({time.time() - t0:.2f}s from init to done)", flush=True)
dist.destroy_process_group()
