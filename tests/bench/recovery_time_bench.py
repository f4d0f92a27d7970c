"""Time from a failure to the first step after recovery, PyTorch DDP + Adam under
torchrun --max-restarts=1: ftcomm.FaultTolerant against a restart that loads a
torch.save checkpoint (rank 0 saves model + optimizer every K steps; every rank
loads it on restart), same model, same kill, same K.

    python3 tests/bench/recovery_time_bench.py [--nproc 2] [--steps 30] [--every 10] [--kill-at 25] [--tries 2]

Reported: seconds from the SIGKILL (rank 1, step --kill-at) to the end of the first
step after the restart (torchrun's restart, Python start-up, group, load, resync,
one step), the steps lost, and whether the final parameters equal an
uninterrupted run's (ftcomm; torch.save resumes keep neither RNG nor per-rank state).
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn

from bench_models import mlp


WIDTHS = [1024, 2048, 2048, 1024]  # 8.4M parameters


def worker(a):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    import ftcomm
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    pg = ftcomm.init_process_group(timeout=120)
    rank = pg.rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(mlp(WIDTHS))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    step = 0
    if a.mode == "ftcomm":
        ft = ftcomm.FaultTolerant(model, opt, a.dir, commit_every=a.every, job_id="bench")
        step = ft.resume()
    else:
        path = os.path.join(a.dir, "ckpt.pt")
        if os.path.exists(path):
            saved = torch.load(path, map_location="cpu")
            model.module.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optim"])
            step = saved["step"]
    resumed = step
    while step < a.steps:
        g = torch.Generator().manual_seed(step * 10 + rank)
        x, y = torch.randn(32, 1024, generator=g), torch.randn(32, 1024, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if attempt == 1 and step == resumed + 1 and rank == 0:
            with open(os.path.join(a.dir, "first_step"), "w") as f:
                json.dump({"t": time.time(), "resumed": resumed}, f)
        if a.mode == "ftcomm":
            ft.step_done(step)
        elif step % a.every == 0:
            if rank == 0:
                tmp = os.path.join(a.dir, "ckpt.pt.tmp")
                torch.save({"model": model.module.state_dict(), "optim": opt.state_dict(), "step": step}, tmp)
                os.replace(tmp, os.path.join(a.dir, "ckpt.pt"))
            dist.barrier()
        if attempt == 0 and rank == 1 and step == a.kill_at:
            with open(os.path.join(a.dir, "killed"), "w") as f:
                json.dump({"t": time.time()}, f)
            os.kill(os.getpid(), signal.SIGKILL)
    if a.mode == "ftcomm":
        ft.close()
    if rank == 0:
        with open(os.path.join(a.dir, "digest"), "w") as f:
            f.write(ftcomm.digest(model.parameters()))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="ftcomm")
    p.add_argument("--dir", default="")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--kill-at", type=int, default=25)
    p.add_argument("--tries", type=int, default=2)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    def launch(mode, d, kill):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
               "--max-restarts=1", "--monitor-interval=0.1", __file__, "--worker", "--mode", mode, "--dir", d,
               "--steps", str(a.steps), "--every", str(a.every), "--kill-at", str(kill)]
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600, check=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))

    reference = tempfile.mkdtemp()
    launch("ftcomm", reference, 0)
    ref_digest = open(os.path.join(reference, "digest")).read()
    params = sum(p.numel() for p in mlp(WIDTHS).parameters())
    print(f"world {a.nproc}, CPU, MLP {params / 1e6:.1f}M params + Adam ({3 * params * 4 / 1e6:.0f} MB of state), "
          f"K={a.every}, rank 1 killed after step {a.kill_at}")
    for mode in ("ftcomm", "torch.save"):
        times, lost = [], []
        for _ in range(a.tries):
            d = tempfile.mkdtemp()
            launch(mode, d, a.kill_at)
            killed = json.load(open(os.path.join(d, "killed")))["t"]
            first = json.load(open(os.path.join(d, "first_step")))
            times.append(first["t"] - killed)
            lost.append(a.kill_at - first["resumed"])
            same = open(os.path.join(d, "digest")).read() == ref_digest
        print(f"{mode:10s}: failure -> first step after recovery {statistics.median(times):.2f} s "
              f"(tries: {', '.join(f'{t:.2f}' for t in times)}), steps lost {lost}, final parameters "
              f"{'equal' if same else 'differ from'} the uninterrupted run's", flush=True)


if __name__ == "__main__":
    sys.exit(main())
