"""What a commit costs a PyTorch DDP step: ftcomm.FaultTolerant against
torch.distributed.checkpoint (DCP) save and async_save of the same state (model and
Adam state_dicts), on the same disk, in one run, beside the physical limit: a copy
of the same bytes into reused host memory (pinned and pageable on a GPU).

    torchrun --nproc-per-node=2 tests/bench/ft_commit_bench.py --dir /tmp/commit-bench [--device cuda]
    ... --widths 2048,4096,4096,4096,4096,4096,4096,2048     # the 1.2 GB model
    ... --slow-disk-mb-s 200     # adds K=1 runs with the writer capped below the step's pace
    ... --memory-steps 1000      # adds a long run: host RSS and staging memory before and after

For each method and K in --every, it trains --steps steps (forward, backward,
Adam) and checkpoints every K steps. Methods: ftcomm (step_done); dcp.save;
dcp.async_save as it comes; dcp.async_save with DefaultStager(StagingOptions(
use_pinned_memory, use_async_staging, use_non_blocking_copy)) on a GPU, its best
configuration in torch 2.11 (shared memory off: one process), a new stager per save
(a reused one fails its second save in torch 2.11).
Reported per method: the mean step time, its overhead over no checkpointing, and
the blocking time per checkpoint: the time the training loop waits in the
checkpoint call, plus, for an async_save whose staging runs in the background, the
wait for that staging before the next optimizer step (it must not change the state
while it is copied). ftcomm's GPU copy runs on a side stream that the next step
waits for on the device: that cost shows in the step time, not the blocking time.

What was saved is checked: the last ftcomm commit is read back by a resume in a
fresh FaultTolerant and compared bit for bit with the live state; the resume's time
(agreement, the blob's checked read, restore into the model and optimizer) is shown
beside a plain read of the same blob file, both from the page cache and, where
posix_fadvise can drop the file's pages, from the disk (ftcomm_bench_store times
the store's read alone).
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
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import ftcomm
from bench_models import mlp


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def drop_cache(path):
    """Drops the file's pages from the page cache (no root needed); False where it cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def read_file_ms(path):
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        view = memoryview(buf)
        while f.readinto(view):
            pass
    return (time.perf_counter() - t) * 1000


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="where checkpoints go (the same disk for every method)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--widths", default="1024,2048,2048,2048,1024")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=22)
    p.add_argument("--every", default="1,10")
    p.add_argument("--methods", default="", help="comma-separated subset (none is always run)")
    p.add_argument("--slow-disk-mb-s", type=float, default=0,
                   help="adds ftcomm K=1 runs with the writer capped at this rate, when_behind wait and skip")
    p.add_argument("--memory-steps", type=int, default=0, help="adds a long ftcomm run (K=10) of this many steps")
    p.add_argument("--pace-ms", type=float, default=0,
                   help="adds this much compute to each step (GPU: a busy kernel), so that the write can keep up")
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
    gpu = device.type == "cuda"

    def sync():
        if gpu:
            torch.cuda.synchronize(device)

    def say(*args):
        if rank == 0:
            print(*args, flush=True)

    # --- the limit: a copy of the same bytes into reused host memory -------------
    def copy_limit():
        torch.manual_seed(0)
        model = mlp(widths).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        model(x).sum().backward()
        opt.step()
        tensors = [t for t in list(model.parameters()) + [s for st in opt.state.values() for s in st.values()]
                   if t.numel() > 1]
        out = {}
        kinds = [("pinned", True), ("pageable", False)] if gpu else [("reused", False)]
        for kind, pinned in kinds:
            dst = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned) for t in tensors]
            times = []
            for _ in range(7):
                sync()
                t0 = time.perf_counter()
                for d, s in zip(dst, tensors):
                    d.copy_(s, non_blocking=pinned)
                sync()
                times.append((time.perf_counter() - t0) * 1000)
            out[kind] = statistics.median(times[2:])
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        return out, nbytes

    stager = None

    def run(method, every, steps=None, ft_kwargs=None, label=None):
        nonlocal stager
        steps = steps or a.steps
        torch.manual_seed(0)
        model = DistributedDataParallel(mlp(widths).to(device),
                                        device_ids=[device.index] if device.index is not None else None)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        where = os.path.join(a.dir, f"{label or method}-{every}")
        if rank == 0:
            shutil.rmtree(where, ignore_errors=True)
        dist.barrier()
        ft = None
        if method == "ftcomm":
            ft = ftcomm.FaultTolerant(model, opt, where, commit_every=every, job_id="bench", **(ft_kwargs or {}))
            ft.resume()
        pending = staging = None
        step_ms, block_ms = [], []
        rss = []
        for step in range(1, steps + 1):
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            if a.pace_ms:  # more compute per step: the GPU kept busy (CPU: the thread sleeps)
                if gpu:
                    torch.cuda._sleep(int(a.pace_ms * 1.4e6))
                else:
                    time.sleep(a.pace_ms / 1000)
            wait_ms = 0.0
            if staging is not None:  # async staging must finish before the state changes
                tw = time.perf_counter()
                staging.result()
                wait_ms = (time.perf_counter() - tw) * 1000
                staging = None
                block_ms[-1] += wait_ms
            opt.step()
            sync()
            t1 = time.perf_counter()
            if method == "ftcomm":
                ft.step_done(step)
            elif method != "none" and step % every == 0:
                # DCP's own state_dict API (flat, FQN-keyed), as its users call it.
                model_sd, optim_sd = get_state_dict(model, opt)
                state = {"model": model_sd, "optim": optim_sd}
                cid = os.path.join(where, f"step{step}")
                if method == "dcp.save":
                    dcp.save(state, checkpoint_id=cid, process_group=dcp_group)
                else:
                    if pending is not None:
                        pending.result()
                    if method == "dcp.async_save":
                        pending = dcp.async_save(state, checkpoint_id=cid, process_group=dcp_group)
                    else:
                        # A stager per save: torch 2.11's DefaultStager fails its second
                        # stage() with KeyError: <class 'type'> (reproduced on CPU too), so
                        # its pinned buffers cannot be reused from one save to the next.
                        if stager is not None:
                            stager.close()
                        stager = DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
                                                              use_async_staging=True, use_non_blocking_copy=True))
                        response = dcp.async_save(state, checkpoint_id=cid, process_group=dcp_group,
                                                  async_stager=stager)
                        pending, staging = response.upload_completion, response.staging_completion
            sync()
            t2 = time.perf_counter()
            step_ms.append((t2 - t0) * 1000)
            if method != "none" and step % every == 0:
                block_ms.append((t2 - t1) * 1000)
            if step == 20 or step == steps:
                rss.append(rss_mb())
        if staging is not None:
            staging.result()
        if pending is not None:
            pending.result()
        row = {"method": label or method, "every": every}
        if ft is not None:
            ft.flush()
            stats = ft.snapshot_stats
            row.update({"waited": stats["waited"], "skipped": stats["skipped"], "taken": stats["taken"],
                        "staging_mb": stats["staging_bytes"] / 1e6, "pinned_mb": stats["pinned_bytes"] / 1e6,
                        "write_ms": stats["write_ms"] / max(1, stats["written"])})
            ft.close()
            # Read the last commit back through a resume and compare bit for bit; time
            # its load beside a plain read of the blob, cached and (where possible) not.
            del ft
            blobs = [os.path.join(where, f"rank{rank}", "blobs", b)
                     for b in sorted(os.listdir(os.path.join(where, f"rank{rank}", "blobs")))]
            blob = blobs[-1] if blobs else None
            loads = {}
            for cache in ("cold", "warm"):
                if cache == "cold" and not (blob and drop_cache(blob)):
                    continue
                # The first read of a file after its write can be slower than the next
                # ones on a VM (the host's own cache): a plain read before the resume
                # as well as after it, each with the guest's cache dropped.
                read_first_ms = None
                if cache == "cold":
                    read_first_ms = read_file_ms(blob)
                    drop_cache(blob)
                if cache == "warm" and blob:
                    read_file_ms(blob)  # in the page cache now
                torch.manual_seed(1)
                other = DistributedDataParallel(mlp(widths).to(device),
                                                device_ids=[device.index] if device.index is not None else None)
                other_opt = torch.optim.Adam(other.parameters(), lr=1e-4)
                ft2 = ftcomm.FaultTolerant(other, other_opt, where, commit_every=every, job_id="bench")
                t = time.perf_counter()
                resumed = ft2.resume()  # agreement, the blob's read and checks, restore
                load_ms = (time.perf_counter() - t) * 1000
                if cache == "cold":
                    drop_cache(blob)
                read_ms = read_file_ms(blob) if blob else 0.0
                loads[cache] = (load_ms, read_ms, read_first_ms)
                last = max(c["step"] for c in ft2.commits() if c.get("snapshot")) if ft2.commits() else -1
                same = resumed == last
                if resumed == steps:
                    same = same and ftcomm.digest(other.parameters()) == ftcomm.digest(model.parameters())
                    s1, s2 = opt.state_dict()["state"], other_opt.state_dict()["state"]
                    same = same and all(torch.equal(s1[k][n].cpu(), s2[k][n].cpu())
                                        for k in s1 for n in ("exp_avg", "exp_avg_sq"))
                row["check"] = "restored bit-exact" if same else f"MISMATCH (resumed {resumed}, newest {last})"
                ft2.close()
                del ft2
            row["blob_mb"] = os.path.getsize(blob) / 1e6 if blob else 0
            row["loads"] = loads
        warm = step_ms[2:]  # the first steps warm up (allocation, bucket rebuild)
        stats = torch.tensor([statistics.mean(warm), statistics.mean(block_ms) if block_ms else 0.0,
                              max(block_ms) if block_ms else 0.0], dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        row.update({"step_ms": stats[0].item(), "block_ms": stats[1].item(), "block_max_ms": stats[2].item(),
                    "commits": len(block_ms), "rss_mb": rss})
        return row

    limits, nbytes = copy_limit()
    say(f"\nPython DDP + Adam, world {world}, {device.type}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if gpu else ''}, state {nbytes / 1e6:.0f} MB per rank "
        f"(parameters + 2 Adam moments), {a.steps} steps, dir {a.dir}")
    say("limit: a copy of the same bytes into reused host memory: " +
        ", ".join(f"{k} {v:.1f} ms" for k, v in limits.items()))
    methods = ["ftcomm", "dcp.save", "dcp.async_save"] + (["dcp.async_save+pinned"] if gpu else [])
    if a.methods:
        methods = [m for m in methods if m in a.methods.split(",")]
    rows = [run("none", 1)]
    for every in [int(e) for e in a.every.split(",")]:
        for method in methods:
            try:
                rows.append(run(method, every))
            except Exception as e:  # noqa: BLE001 - one method's failure must not lose the others' rows
                if world > 1:
                    raise
                say(f"  {method} K={every} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            say(f"  {rows[-1]['method']:24s} K={every}: step {rows[-1]['step_ms']:.1f} ms, "
                f"block {rows[-1]['block_ms']:.1f} ms")
    if a.slow_disk_mb_s:
        for policy in ("wait", "skip"):
            rows.append(run("ftcomm", 1, ft_kwargs={"write_mb_per_s": a.slow_disk_mb_s, "when_behind": policy},
                            label=f"ftcomm slow disk {policy}"))
    if a.memory_steps:
        rows.append(run("ftcomm", 10, steps=a.memory_steps, label=f"ftcomm {a.memory_steps} steps"))
    base = rows[0]["step_ms"]
    limit = limits.get("pinned", limits.get("reused"))
    if rank == 0:
        print(f"\n{'method':26s} {'K':>3s} {'step ms':>8s} {'overhead':>9s} {'block ms':>9s} {'max':>7s} "
              f"{'/limit':>7s} {'waited':>6s} {'skipped':>7s}  check")
        for r in rows:
            r["overhead"] = r["step_ms"] / base - 1
            print(f"{r['method']:26s} {r['every']:3d} {r['step_ms']:8.1f} {r['overhead'] * 100:8.1f}% "
                  f"{r['block_ms']:9.1f} {r['block_max_ms']:7.1f} {r['block_ms'] / limit:7.2f} "
                  f"{r.get('waited', ''):>6} {r.get('skipped', ''):>7}  {r.get('check', '')}")
        print(f"\nlimit (copy of {nbytes / 1e6:.0f} MB): {limit:.1f} ms; step without checkpoints {base:.1f} ms")
        for every in sorted({r["every"] for r in rows[1:]}):
            by = {r["method"]: r for r in rows if r["every"] == every}
            if "ftcomm" not in by:
                continue
            f = by["ftcomm"]
            parts = [f"K={every}: ftcomm blocking / copy limit = {f['block_ms'] / limit:.2f}"]
            for other in ("dcp.save", "dcp.async_save", "dcp.async_save+pinned"):
                if other in by and by[other]["block_ms"] > 0:
                    parts.append(f"/ {other} = {f['block_ms'] / by[other]['block_ms']:.3f}")
            budget = limit / every + 0.01 * base
            parts.append(f"; step overhead {f['step_ms'] - base:.2f} ms against a budget of {budget:.2f} ms "
                         f"(limit / K + 1% of the step)")
            print(" ".join(parts))
        for r in rows:
            if "loads" in r:
                for cache, (load_ms, read_ms, read_first_ms) in r["loads"].items():
                    before = "" if read_first_ms is None else f"; the plain read before the resume {read_first_ms:.1f} ms"
                    print(f"load {r['method']} K={r['every']} ({cache}): resume() {load_ms:.1f} ms, plain read "
                          f"of the {r['blob_mb']:.0f} MB blob {read_ms:.1f} ms ({load_ms / max(read_ms, 1e-9):.2f}x)"
                          f"{before}")
            if r["method"].startswith("ftcomm") and len(r.get("rss_mb", [])) == 2:
                print(f"memory {r['method']} K={r['every']}: host RSS {r['rss_mb'][0]:.0f} MB at step 20, "
                      f"{r['rss_mb'][1]:.0f} MB at the end; staging {r.get('staging_mb', 0):.0f} MB "
                      f"({r.get('pinned_mb', 0):.0f} MB pinned); writes {r.get('write_ms', 0):.1f} ms each")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"world": world, "device": device.type, "state_mb": nbytes / 1e6, "limits_ms": limits,
                           "rows": rows}, f, indent=1)
    if stager is not None:
        stager.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
