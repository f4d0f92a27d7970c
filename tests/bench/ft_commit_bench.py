"""What a commit costs a PyTorch DDP step: ftcomm.FaultTolerant against
torch.distributed.checkpoint (DCP) save and async_save of the same state (model and
Adam state_dicts), on the same disk, in one run.

    torchrun --nproc-per-node=2 tests/bench/ft_commit_bench.py --dir /tmp/commit-bench [--device cuda]

For each method and K in --every, it trains --steps steps (forward, backward,
Adam) and checkpoints every K steps. Reported per method: the mean step time,
its overhead over no checkpointing, and the blocking time per checkpoint (the
time the training loop waits in the checkpoint call: for ftcomm, step_done when a
commit is due, which copies to host and hands the write to a background thread;
for DCP save, the whole write; for async_save, the call, which stages to host
memory). What was saved is checked: the last ftcomm commit is read back by a
resume in a fresh FaultTolerant and compared bit for bit with the live state.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import ftcomm
from bench_models import mlp


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="where checkpoints go (the same disk for every method)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--widths", default="1024,2048,2048,2048,1024")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", default="1,10")
    p.add_argument("--json", default="")
    a = p.parse_args()

    pg = ftcomm.init_process_group(timeout=600)
    rank, world = pg.rank(), pg.size()
    device = torch.device("cuda", torch.cuda.current_device()) if a.device == "cuda" else torch.device("cpu")
    widths = [int(w) for w in a.widths.split(",")]
    # DCP's own collectives (async_save's run on a background thread) get a group of
    # their own, so they never interleave with the training's on one Gloo group.
    dcp_group = dist.new_group(backend="gloo")
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(a.batch, widths[0], generator=gen).to(device)
    y = torch.randn(a.batch, widths[-1], generator=gen).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(method, every):
        torch.manual_seed(0)
        model = DistributedDataParallel(mlp(widths).to(device),
                                        device_ids=[device.index] if device.index is not None else None)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        where = os.path.join(a.dir, f"{method}-{every}")
        if rank == 0:
            shutil.rmtree(where, ignore_errors=True)
        dist.barrier()
        ft = None
        if method == "ftcomm":
            ft = ftcomm.FaultTolerant(model, opt, where, commit_every=every, job_id="bench")
            ft.resume()
        pending = None
        step_ms, block_ms = [], []
        for step in range(1, a.steps + 1):
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync()
            t1 = time.perf_counter()
            if method == "ftcomm":
                ft.step_done(step)
            elif method != "none" and step % every == 0:
                state = {"model": model.module.state_dict(), "optim": opt.state_dict()}
                cid = os.path.join(where, f"step{step}")
                if method == "dcp.save":
                    dcp.save(state, checkpoint_id=cid, process_group=dcp_group)
                else:
                    if pending is not None:
                        pending.result()
                    pending = dcp.async_save(state, checkpoint_id=cid, process_group=dcp_group)
            sync()
            t2 = time.perf_counter()
            step_ms.append((t2 - t0) * 1000)
            if method != "none" and step % every == 0:
                block_ms.append((t2 - t1) * 1000)
        if pending is not None:
            pending.result()
        check = ""
        if ft is not None:
            ft.close()
            # Read the last commit back through a resume and compare bit for bit.
            torch.manual_seed(1)
            other = DistributedDataParallel(mlp(widths).to(device),
                                            device_ids=[device.index] if device.index is not None else None)
            other_opt = torch.optim.Adam(other.parameters(), lr=1e-4)
            del ft
            ft2 = ftcomm.FaultTolerant(other, other_opt, where, commit_every=every, job_id="bench")
            resumed = ft2.resume()
            last = a.steps - a.steps % every
            same = resumed == last
            if resumed == a.steps:
                same = same and ftcomm.digest(other.parameters()) == ftcomm.digest(model.parameters())
                s1, s2 = opt.state_dict()["state"], other_opt.state_dict()["state"]
                same = same and all(torch.equal(s1[k][n], s2[k][n]) for k in s1 for n in ("exp_avg", "exp_avg_sq"))
            check = "restored bit-exact" if same else f"MISMATCH (resumed {resumed}, expected {last})"
            ft2.close()
        # The first steps warm up (allocation, bucket rebuild); skip two.
        warm = step_ms[2:]
        stats = torch.tensor([statistics.mean(warm), statistics.mean(block_ms) if block_ms else 0.0],
                             dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        return {"method": method, "every": every, "step_ms": stats[0].item(), "block_ms": stats[1].item(),
                "commits": len(block_ms), "check": check}

    state_mb = 3 * sum(w1 * w2 + w2 for w1, w2 in zip(widths[:-1], widths[1:])) * 4 / 1e6
    rows = [run("none", 1)]
    for every in [int(e) for e in a.every.split(",")]:
        for method in ("ftcomm", "dcp.save", "dcp.async_save"):
            rows.append(run(method, every))
    base = rows[0]["step_ms"]
    if rank == 0:
        print(f"\nPython DDP + Adam, world {world}, {device.type}, state {state_mb:.0f} MB per rank "
              f"(parameters + 2 Adam moments), {a.steps} steps, dir {a.dir}")
        print(f"{'method':16s} {'every':>5s} {'step ms':>9s} {'overhead':>9s} {'block ms/commit':>16s}  check")
        for r in rows:
            r["overhead"] = r["step_ms"] / base - 1
            print(f"{r['method']:16s} {r['every']:5d} {r['step_ms']:9.1f} {r['overhead'] * 100:8.1f}% "
                  f"{r['block_ms']:16.1f}  {r['check']}")
        for every in sorted({r["every"] for r in rows[1:]}):
            by = {r["method"]: r for r in rows if r["every"] == every}
            print(f"K={every}: ftcomm blocking / dcp.save = {by['ftcomm']['block_ms'] / by['dcp.save']['block_ms']:.3f}, "
                  f"/ dcp.async_save = {by['ftcomm']['block_ms'] / by['dcp.async_save']['block_ms']:.3f}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"world": world, "device": device.type, "state_mb": state_mb, "rows": rows}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
