"""Time from a failure to the first step after recovery, PyTorch DDP + Adam under
torchrun --max-restarts=1: ftcomm.FaultTolerant with just-in-time commits and no
periodic ones, FaultTolerant with periodic commits every K steps (just in time
off), and a restart that loads a torch.save checkpoint (rank 0 saves model +
optimizer every K steps; every rank loads it on restart); same model, same kill.
Also the steady state: ms per step of plain DDP, and of each of those without a
failure.

    python3 tests/bench/recovery_time_bench.py [--nproc 2] [--steps 30] [--kill-at 25] [--tries 2]

Reported: seconds from the SIGKILL (rank 1, step --kill-at, after its step and
before the next) to the end of the first step after the restart (torchrun's
restart, Python start-up, group, load, resync, one step), the steps lost, and
whether the final parameters equal an uninterrupted run's (torch.save resumes
keep neither RNG nor per-rank state; this model uses neither).
"""
import argparse
import json
import os
import shutil
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
    parts = {"imported": time.time()}  # where a restart's time goes (rank 0, attempt 1)
    pg = ftcomm.init_process_group(timeout=120)
    parts["group"] = time.time()
    rank = pg.rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(mlp(WIDTHS))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    parts["model"] = time.time()
    step = 0
    ft = None
    if a.mode in ("ftcomm", "jit"):
        ft = ftcomm.FaultTolerant(model, opt, a.dir, commit_every=a.every if a.mode == "ftcomm" else 0,
                                  jit=a.mode == "jit", job_id="bench")
        parts["store"] = time.time()
        step = ft.resume()
        parts["report"] = {k: ft.report.get(k, 0) for k in ("agreement_ms", "load_ms", "resync_ms")}
    elif a.mode == "torch.save":
        path = os.path.join(a.dir, "ckpt.pt")
        parts["store"] = time.time()
        if os.path.exists(path):
            saved = torch.load(path, map_location="cpu")
            model.module.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optim"])
            step = saved["step"]
    parts["resumed"] = time.time()
    resumed = step
    step_ms = []
    while step < a.steps:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(step * 10 + rank)
        x, y = torch.randn(32, 1024, generator=g), torch.randn(32, 1024, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if attempt == 1 and step == resumed + 1 and rank == 0:
            with open(os.path.join(a.dir, "first_step"), "w") as f:
                json.dump({"t": time.time(), "resumed": resumed, "parts": parts}, f)
        if ft is not None:
            ft.step_done(step)
        elif a.mode == "torch.save" and step % a.every == 0:
            if rank == 0:
                tmp = os.path.join(a.dir, "ckpt.pt.tmp")
                torch.save({"model": model.module.state_dict(), "optim": opt.state_dict(), "step": step}, tmp)
                os.replace(tmp, os.path.join(a.dir, "ckpt.pt"))
            dist.barrier()
        step_ms.append((time.perf_counter() - t0) * 1000)
        if attempt == 0 and rank == 1 and step == a.kill_at:
            with open(os.path.join(a.dir, "killed"), "w") as f:
                json.dump({"t": time.time()}, f)
            os.kill(os.getpid(), signal.SIGKILL)
    if ft is not None:
        ft.close()
    if rank == 0:
        with open(os.path.join(a.dir, "digest"), "w") as f:
            f.write(ftcomm.digest(model.parameters()))
        with open(os.path.join(a.dir, "steady.json"), "w") as f:
            json.dump(step_ms[3:], f)  # past the first steps (bucket rebuild, warm-up)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="ftcomm")
    p.add_argument("--dir", default="")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--kill-at", type=int, default=25)
    p.add_argument("--tries", type=int, default=2)
    p.add_argument("--steady-steps", type=int, default=40)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    def launch(mode, d, kill):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
               "--max-restarts=1", "--monitor-interval=0.1", __file__, "--worker", "--mode", mode, "--dir", d,
               "--steps", str(a.steps), "--every", str(a.every), "--kill-at", str(kill)]
        # The workers' output goes to a log beside the run's files; on a failure its
        # end is shown (a kill's tracebacks are expected, a failed launch's are not).
        log = os.path.join(d, "torchrun.log")
        with open(log, "w") as out:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=600,
                                  env=dict(os.environ, OMP_NUM_THREADS="1"))
        if done.returncode != 0:
            with open(log) as f:
                tail = f.read()[-3000:]
            raise SystemExit(f"recovery_time_bench: {mode} (kill at {kill}) failed with exit code "
                             f"{done.returncode}; the end of {log}:\n{tail}")

    params = sum(p.numel() for p in mlp(WIDTHS).parameters())
    print(f"world {a.nproc}, CPU, MLP {params / 1e6:.1f}M params + Adam ({3 * params * 4 / 1e6:.0f} MB of state)")
    # (mode, K) -> label
    steady = {("plain", 10): "plain DDP (no fault tolerance)", ("jit", 10): "FaultTolerant just in time, no periodic",
              ("ftcomm", 10): "FaultTolerant periodic K=10", ("ftcomm", 1): "FaultTolerant periodic K=1",
              ("torch.save", 10): "torch.save K=10"}
    times = {k: [] for k in steady}
    steps = a.steps
    a.steps = a.steady_steps
    for _ in range(a.tries):
        for (mode, every) in steady:
            d = tempfile.mkdtemp()
            a.every = every
            launch(mode, d, 0)
            times[(mode, every)].append(statistics.median(json.load(open(os.path.join(d, "steady.json")))))
            shutil.rmtree(d, ignore_errors=True)
    base = statistics.median(times[("plain", 10)])
    print(f"steady state ({a.steady_steps} steps, rank 0's median step, {a.tries} interleaved tries):")
    print("| method | ms/step | x plain DDP | tries |\n| --- | --- | --- | --- |")
    for k, label in steady.items():
        med = statistics.median(times[k])
        print(f"| {label} | {med:.1f} | {med / base:.3f} | {', '.join(f'{t:.1f}' for t in times[k])} |", flush=True)

    a.steps = steps
    reference = tempfile.mkdtemp()
    a.every = 10
    launch("plain", reference, 0)
    ref_digest = open(os.path.join(reference, "digest")).read()
    print(f"\nrank 1 SIGKILLed after step {a.kill_at} (before step {a.kill_at + 1}), {a.steps} steps:")
    print("| method | failure -> first step after recovery | steps lost | final parameters |\n| --- | --- | --- | --- |")
    failure = {("jit", 10): "FaultTolerant just in time, no periodic", ("ftcomm", 1): "FaultTolerant periodic K=1",
               ("ftcomm", 10): "FaultTolerant periodic K=10", ("torch.save", 10): "torch.save K=10",
               ("torch.save", 1): "torch.save K=1"}
    split = {}
    for (mode, every), label in failure.items():
        a.every = every
        secs, lost, same = [], [], []
        for _ in range(a.tries):
            d = tempfile.mkdtemp()
            launch(mode, d, a.kill_at)
            killed = json.load(open(os.path.join(d, "killed")))["t"]
            first = json.load(open(os.path.join(d, "first_step")))
            secs.append(first["t"] - killed)
            p = first["parts"]
            split.setdefault(label, []).append({
                "to start": p["imported"] - killed, "group": p["group"] - p["imported"],
                "model": p["model"] - p["group"], "store open": p["store"] - p["model"],
                "resume": p["resumed"] - p["store"], "first step": first["t"] - p["resumed"],
                **{k: v / 1000 for k, v in p.get("report", {}).items()}})
            lost.append(a.kill_at - first["resumed"])
            same.append(open(os.path.join(d, "digest")).read() == ref_digest)
            shutil.rmtree(d, ignore_errors=True)
        print(f"| {label} | {statistics.median(secs):.2f} s ({', '.join(f'{t:.2f}' for t in secs)}) | "
              f"{', '.join(map(str, lost))} | {'equal' if all(same) else 'differ'} |", flush=True)
    keys = ["to start", "group", "model", "store open", "resume", "agreement_ms", "load_ms", "resync_ms", "first step"]
    print("\nwhere it goes (rank 0 of the restarted attempt, seconds, median of the tries; 'to start': from the kill "
          "to the restarted worker's imports done; 'resume' (ftcomm: agreement with the blob's read, load, resync; "
          "torch.save: torch.load and load_state_dict) is ftcomm's own part with 'store open'):")
    print("| method | " + " | ".join(k.replace("_ms", "") for k in keys) + " |\n|" + " --- |" * (len(keys) + 1))
    for label, rows in split.items():
        print(f"| {label} | " + " | ".join(f"{statistics.median(r.get(k, 0) for r in rows):.3f}" for k in keys) + " |")


if __name__ == "__main__":
    sys.exit(main())
