"""PyTorch's DistributedDataParallel with ftcomm's TorchScript hooks against the same
DDP with PyTorch's own Python hooks, one run, same model, group and batches.

    torchrun --nproc-per-node=2 tests/bench/python_hooks_bench.py [--device cuda] [--model mlp|deep]

Every method is a DDP model of the same initial weights; each round runs every
method for --steps forward+backward steps (round-robin, so drift hits all alike)
and the median round is reported. What was timed is checked: after the last round
each method's gradients are compared with the default DDP's (bit-equal expected
for allreduce; fp16/bf16 against PyTorch's counterpart; PowerSGD as relative error).
One command for the hook-speed comparison: c10d's built-ins (DDP's default
allreduce, FP16_COMPRESS), PyTorch's Python hooks, and ftcomm's TorchScript hooks (and
noop), all in PyTorch's DDP, whose Reducer runs ftcomm's hooks as the C++ trainer does.
Rank 0 prints a table, the targets (at most 1.03x c10d's built-in, on GPUs and CPUs;
ftcomm noop faster than PyTorch's noop_hook, and the machinery's cost per step; every
ftcomm hook faster per step than its PyTorch counterpart, PowerSGD at most 0.75x) and,
with --json, writes it. Ratios are the median over rounds of each round's ratio (the
methods of a round run moments apart, so a drift of the host moves both sides), with
the rounds' range beside them. FTCOMM_BENCH_PIN=1 pins each rank to its own share of
the cores (pin_cores.py). Two
models: --model mlp (short backward, fixed costs exposed) and --model deep (12 layers
of 2048, backward long enough to hide communication).
"""
import argparse
import os
import json
import statistics
import sys
import time

from pin_cores import PINNED  # before torch starts a thread
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import debugging_hooks, default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

import ftcomm
from bench_models import mlp


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="mlp", choices=["mlp", "deep"],
                   help="mlp: 1024-2048-2048-2048-1024; deep: 12 layers of 2048")
    p.add_argument("--widths", default="", help="layer widths, instead of --model's")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--powersgd-rank", type=int, default=4)
    p.add_argument("--powersgd-bucket-mb", type=float, default=0,
                   help="DDP bucket_cap_mb of both PowerSGD models (0: DDP's default). PyTorch's Python "
                        "powerSGD_hook on Gloo crashes or hangs with several buckets (its collectives are issued "
                        "from future callbacks, in different orders on different ranks); one bucket avoids it")
    p.add_argument("--bucket-cap-mb", type=float, default=0,
                   help="DDP bucket_cap_mb of every model but PowerSGD's (0: DDP's default, 25 MB after a 1 MB "
                        "first bucket)")
    p.add_argument("--agreement", default="auto", help="ftcomm hooks' agreement (register_hook(agreement=))")
    p.add_argument("--also-agreement", default="",
                   help="adds ftcomm allreduce and noop rows with this agreement too (e.g. off), to see its cost")
    p.add_argument("--variant-dir", default="",
                   help="a folder of hook files named as ftcomm's (allreduce.py, ...): each of ftcomm's rows gets a "
                        "row for that folder's version beside it, timed in the same rounds")
    p.add_argument("--only", default="", help="comma-separated method names")
    p.add_argument("--json", default="")
    a = p.parse_args()

    pg = ftcomm.init_process_group(timeout=300)
    rank, world = pg.rank(), pg.size()
    device = torch.device("cuda", torch.cuda.current_device()) if a.device == "cuda" else torch.device("cpu")
    preset = {"mlp": "1024,2048,2048,2048,1024", "deep": ",".join(["2048"] * 13)}[a.model]
    widths = [int(w) for w in (a.widths or preset).split(",")]
    r = a.powersgd_rank

    def python_powersgd():
        return powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=r, start_powerSGD_iter=2,
                                           use_error_feedback=True, warm_start=True)

    default = "ddp default (c10d built-in allreduce)"
    fp16_builtin = "ddp c10d built-in FP16_COMPRESS"
    # (name, how, the PyTorch hook it is compared with, the c10d built-in it is compared with)
    methods = [
        (default, None, None, None),
        (fp16_builtin, ("builtin", dist.BuiltinCommHookType.FP16_COMPRESS), None, None),
        ("pytorch allreduce_hook", ("py", default_hooks.allreduce_hook, lambda: None), None, None),
        ("ftcomm allreduce", ("ts", "allreduce", {}), "pytorch allreduce_hook", default),
        ("pytorch fp16_compress_hook", ("py", default_hooks.fp16_compress_hook, lambda: None), None, None),
        ("ftcomm fp16_compress", ("ts", "fp16_compress", {}), "pytorch fp16_compress_hook", fp16_builtin),
        ("pytorch bf16_compress_hook", ("py", default_hooks.bf16_compress_hook, lambda: None), None, None),
        ("ftcomm bf16_compress", ("ts", "bf16_compress", {}), "pytorch bf16_compress_hook", None),
        (f"pytorch powerSGD_hook r{r}", ("py", powerSGD_hook.powerSGD_hook, python_powersgd), None, None),
        (f"ftcomm powersgd r{r}", ("ts", "powersgd", {"rank": r, "start_iter": 2}), f"pytorch powerSGD_hook r{r}",
         None),
        # No communication at all: what the scripted machinery costs, against PyTorch's
        # Python noop_hook (the same machinery question in Python) and DDP's default.
        ("pytorch noop_hook", ("py", debugging_hooks.noop_hook, lambda: None), None, None),
        ("ftcomm noop", ("ts", "noop", {}), "pytorch noop_hook", default),
    ]
    if a.powersgd_bucket_mb:
        # PyTorch's hook needs one bucket on Gloo; ftcomm's runs with DDP's own buckets
        # too, where its work overlaps backward (what a user of each would run).
        methods.append((f"ftcomm powersgd r{r} [DDP buckets]", ("ts", "powersgd", {"rank": r, "start_iter": 2}),
                        f"pytorch powerSGD_hook r{r}", None))
    if a.also_agreement:
        methods += [(f"ftcomm allreduce [{a.also_agreement}]", ("ts", "allreduce", {}, a.also_agreement),
                     "pytorch allreduce_hook", default),
                    (f"ftcomm noop [{a.also_agreement}]", ("ts", "noop", {}, a.also_agreement), "pytorch noop_hook",
                     default)]
    if a.variant_dir:
        label = os.path.basename(os.path.normpath(a.variant_dir))
        for name, how, hook_ref, builtin_ref in list(methods):
            if how is not None and how[0] == "ts" and os.path.exists(os.path.join(a.variant_dir, how[1] + ".py")):
                variant = ("ts", os.path.join(a.variant_dir, how[1] + ".py")) + tuple(how[2:])
                methods.append((f"{name} [{label}]", variant, hook_ref, builtin_ref))
    if a.only:
        keep = set(a.only.split(","))
        methods = [m for m in methods if m[0] in keep or m[0] == methods[0][0]]

    models = []
    for name, how, _, _ in methods:
        torch.manual_seed(0)
        powersgd = "powersgd" in name.lower() and "[DDP buckets]" not in name
        cap = {"bucket_cap_mb": a.powersgd_bucket_mb} if powersgd and a.powersgd_bucket_mb else \
            ({"bucket_cap_mb": a.bucket_cap_mb} if a.bucket_cap_mb and not powersgd else {})
        model = DistributedDataParallel(mlp(widths).to(device), device_ids=[device.index] if device.index is not None
                                        else None, **cap)
        if how is not None and how[0] == "py":
            model.register_comm_hook(how[2](), how[1])
        elif how is not None and how[0] == "builtin":
            model._register_builtin_comm_hook(how[1])
        elif how is not None:
            agreement = how[3] if len(how) > 3 else a.agreement
            model._bench_hook = ftcomm.register_hook(model, how[1], agreement=agreement, **how[2])
        models.append(model)

    gen = torch.Generator().manual_seed(100 + rank)
    batches = [(torch.randn(a.batch, widths[0], generator=gen).to(device),
                torch.randn(a.batch, widths[-1], generator=gen).to(device)) for _ in range(a.steps)]

    def step(model, x, y):
        model.zero_grad(set_to_none=False)
        nn.functional.mse_loss(model(x), y).backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for model in models:  # warm up: bucket rebuild, PowerSGD past start_iter, CUDA kernels
        for i in range(4):
            step(model, *batches[i % len(batches)])
    sync()
    times = [[] for _ in models]
    for _ in range(a.rounds):
        for i, model in enumerate(models):
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            for x, y in batches:
                step(model, x, y)
            sync()
            times[i].append((time.perf_counter() - t0) / len(batches) * 1000)
    # Every rank's time is its own; a round is as slow as its slowest rank.
    rounds = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(rounds, op=dist.ReduceOp.MAX, group=dist.new_group(backend="gloo"))
    med = rounds.quantile(0.5, dim=1)

    def paired(i, j):
        """The median and range over rounds of method i's round time over method j's."""
        per_round = (rounds[i] / rounds[j]).tolist()
        return statistics.median(per_round), min(per_round), max(per_round)

    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]).float() for m in models]
    names = [m[0] for m in methods]
    ref = grads[0]

    def rel(a_, b_):
        return ((a_ - b_).norm() / b_.norm()).item()

    rows = []
    for i, name in enumerate(names):
        vs_default = med[i].item() / med[0].item()
        counterpart = names.index(methods[i][2]) if methods[i][2] in names else None
        builtin = names.index(methods[i][3]) if methods[i][3] in names else None
        if torch.equal(grads[i], ref):
            check = "equal"
        elif builtin is not None and torch.equal(grads[i], grads[builtin]):
            check = "equal to the c10d built-in"
        elif counterpart is not None and torch.equal(grads[i], grads[counterpart]):
            check = "equal to pytorch's"
        elif counterpart is not None:
            check = f"rel err {rel(grads[i], grads[counterpart]):.2e} vs pytorch's, {rel(grads[i], ref):.2e} vs default"
        else:
            check = f"rel err {rel(grads[i], ref):.2e} vs default"
        hook = getattr(models[i], "_bench_hook", None)
        vs_pt = paired(i, counterpart) if counterpart is not None else (None, None, None)
        vs_c10d = paired(i, builtin) if builtin is not None else (None, None, None)
        rows.append({"method": name, "step_ms": med[i].item(), "vs_default": vs_default,
                     "vs_pytorch_hook": vs_pt[0], "vs_pytorch_hook_range": vs_pt[1:],
                     "vs_c10d_builtin": vs_c10d[0], "vs_c10d_builtin_range": vs_c10d[1:],
                     "agreement": hook.agreement if hook is not None else None,
                     "check": check})
    if rank == 0:
        numel = sum(p.numel() for p in models[0].parameters())
        print(f"\nPython DDP step (forward+backward), world {world}, {device.type}, model {numel} params "
              f"({numel * 4 / 1e6:.1f} MB grads), batch {a.batch}, {torch.get_num_threads()} threads per rank, "
              f"median of {a.rounds} rounds x {a.steps} steps"
              + (f"; each rank pinned to {len(PINNED)} cores" if PINNED else "")
              + (f"; PowerSGD models with bucket_cap_mb={a.powersgd_bucket_mb:g}" if a.powersgd_bucket_mb else ""))
        def spread(v, r):
            return f"{v:.3f} ({r[0]:.2f}-{r[1]:.2f})" if v is not None else "-"

        print(f"{'method':40s} {'step ms':>9s} {'x default':>10s} {'x c10d (rounds)':>18s} "
              f"{'x pytorch hook (rounds)':>24s}  check")
        for row in rows:
            agreement = f" [{row['agreement']}]" if row["agreement"] else ""
            print(f"{row['method']:40s} {row['step_ms']:9.2f} {row['vs_default']:10.3f} "
                  f"{spread(row['vs_c10d_builtin'], row['vs_c10d_builtin_range']):>18s} "
                  f"{spread(row['vs_pytorch_hook'], row['vs_pytorch_hook_range']):>24s}  {row['check']}{agreement}")
        # The hook-speed targets: at most 1.03x c10d's built-in on GPUs (1.05x on
        # the CPU), noop within 2% of DDP's default, each ftcomm hook faster than
        # its PyTorch counterpart per step, PowerSGD at most 0.75x of it.
        for row in rows:
            # noop's target in Python DDP is PyTorch's noop_hook (the machinery alone,
            # side by side); against the communicating default it is only shown.
            if row["vs_c10d_builtin"] is not None and not row["method"].startswith("ftcomm noop"):
                limit = 1.03  # issue 29: CPU and GPU alike
                print(f"target: {row['method']} / c10d built-in = {row['vs_c10d_builtin']:.3f} "
                      f"(<= {limit:.2f}: {'met' if row['vs_c10d_builtin'] <= limit else 'MISSED'})")
            if row["vs_pytorch_hook"] is not None:
                limit = 0.75 if "powersgd" in row["method"] else 1.0  # noop: faster than pytorch's noop_hook
                ok = row["vs_pytorch_hook"] <= limit if limit < 1 else row["vs_pytorch_hook"] < 1.0
                print(f"target: {row['method']} / pytorch's = {row['vs_pytorch_hook']:.3f} "
                      f"({'<= 0.75' if limit < 1 else '< 1'}: {'met' if ok else 'MISSED'})")
        # The scripted machinery alone (no communication on either side), per step:
        # ftcomm's noop against PyTorch's Python noop_hook.
        for row in rows:
            if row["method"].startswith("ftcomm noop"):
                base = next(r for r in rows if r["method"] == "pytorch noop_hook")
                print(f"machinery: {row['method']} costs {row['step_ms'] - base['step_ms']:+.2f} ms per step against "
                      f"pytorch's noop_hook ({row['vs_pytorch_hook']:.3f}x), world {world}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"world": world, "device": device.type, "params": numel, "batch": a.batch, "widths": widths,
                           "threads": torch.get_num_threads(), "pinned_cores": len(PINNED) if PINNED else None,
                           "rounds": a.rounds, "steps": a.steps, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
