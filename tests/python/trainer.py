"""A PyTorch DDP trainer for the Python package's tests, run under torchrun.

A small CNN with BatchNorm and dropout, Adam, per-step data from a seeded
generator, ftcomm.init_process_group / register_hook / FaultTolerant. It writes
its final digest (parameters, buffers, optimizer state) to --out on rank 0 and
dies, when told to, on the first attempt with SIGKILL at a given step and phase.
"""
import argparse
import json
import os
import shutil
import signal
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import ftcomm


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 8 * 8, 64)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc2(self.drop(F.relu(self.fc1(x.flatten(1)))))


def batch(step, rank, size, device):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(size, 1, 16, 16, generator=g)
    y = torch.randint(0, 10, (size,), generator=g)
    return x.to(device), y.to(device)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--hook", default="allreduce")
    p.add_argument("--hook-arg", action="append", default=[], help="k=v")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--commit-every", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--kill", default="", help="RANK:STEP:PHASE (forward|backward|step|commit) on attempt 0; "
                   "term:PHASE sends SIGTERM (as torchrun does) instead of SIGKILL")
    p.add_argument("--jit", type=int, default=1, help="FaultTolerant(jit=...)")
    p.add_argument("--jit-policy", default="exact")
    p.add_argument("--write-mb-per-s", type=float, default=0, help="FaultTolerant(write_mb_per_s=...): a slow disk")
    p.add_argument("--when-behind", default="wait")
    p.add_argument("--kill-before-resume", type=int, default=-1, help="this rank dies before resume on attempt 1")
    p.add_argument("--wipe", type=int, default=-1, help="this rank's store is deleted before attempt 1")
    p.add_argument("--job-id", default="trainer")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--on-error", default="fail")
    a = p.parse_args()

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    pg = ftcomm.init_process_group(timeout=a.timeout)
    rank, world = pg.rank(), pg.size()
    torch.manual_seed(1234 + rank)  # dropout differs per rank: the RNG restore is checked
    device = torch.device("cuda", torch.cuda.current_device()) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.manual_seed(99 + rank)

    if attempt == 1 and rank == a.wipe:
        shutil.rmtree(os.path.join(a.ckpt, f"rank{rank}"), ignore_errors=True)
    net = Net().to(device)
    model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    params = dict(kv.split("=", 1) for kv in a.hook_arg)
    hook = ftcomm.register_hook(model, a.hook, on_error=a.on_error, **params) if a.hook != "none" else None
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    user = {"epoch": 0, "seen": 0}
    try:
        ft = ftcomm.FaultTolerant(model, opt, a.ckpt, commit_every=a.commit_every, hook=hook, job_id=a.job_id,
                                  settings={"lr": a.lr}, user_state=user, jit=bool(a.jit), jit_policy=a.jit_policy,
                                  write_mb_per_s=a.write_mb_per_s, when_behind=a.when_behind)
        if attempt == 1 and rank == a.kill_before_resume:
            os.kill(os.getpid(), signal.SIGKILL)
        step = ft.resume()
    except ftcomm.ResumeRefused as e:  # the tests read what the typed error carries
        print(f"trainer: rank {rank} ResumeRefused step={e.step} settings={e.settings}", flush=True)
        raise
    except ftcomm.StoreError as e:
        print(f"trainer: rank {rank} StoreError code={e.code}", flush=True)
        raise
    if rank == 0:
        print(f"trainer: attempt {attempt} resumed at {step}: {json.dumps(ft.report)}", flush=True)
    kill_rank, kill_step, phase = (a.kill.split(":", 2) + ["", "", ""])[:3] if a.kill else ("-1", "-1", "")
    die = attempt == 0 and rank == int(kill_rank)

    how = signal.SIGKILL
    if phase.startswith("term:"):
        how, phase = signal.SIGTERM, phase[len("term:"):]

    def maybe_die(at_step, at_phase):
        if die and at_step == int(kill_step) and at_phase == phase:
            print(f"trainer: rank {rank} killed at step {at_step} ({at_phase}, {how.name})", flush=True)
            os.kill(os.getpid(), how)
            if how == signal.SIGTERM:
                time.sleep(60)  # ftcomm's SIGTERM handler saves and exits meanwhile

    while step < a.steps:
        x, y = batch(step, rank, 16, device)
        maybe_die(step + 1, "forward")
        loss = F.cross_entropy(model(x), y)
        maybe_die(step + 1, "backward")
        opt.zero_grad(set_to_none=True)
        try:
            loss.backward()
        except ftcomm.HookError as e:
            print(f"trainer: rank {rank} HookError hook={e.hook} rank={e.rank} bucket={e.bucket} stuck={e.stuck}",
                  flush=True)
            raise
        maybe_die(step + 1, "step")
        opt.step()
        step += 1
        user["seen"] += x.shape[0]
        user["epoch"] = step // 5
        ft.step_done(step)
        maybe_die(step, "commit")
    ft.close()

    module_state = [t for t in model.module.state_dict().values()]
    opt_state = [v for s in opt.state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]
    digest = ftcomm.digest(module_state + opt_state)
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump({"digest": digest, "user": user, "attempt": attempt, "report": ft.report, "loss": loss.item(),
                       "fallbacks": hook.fallbacks if hook else 0, "snapshots": ft.snapshot_stats}, f)
    print(f"trainer: rank {rank} done at step {step} digest {digest[:16]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
