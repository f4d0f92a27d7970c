"""One misuse of the Python API per --case, in a world of one (or two) under
torchrun; prints "CAUGHT <type>: <message>" and exits 3, or exits 0 if nothing
was refused."""
import argparse
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import ftcomm


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--case", required=True)
    p.add_argument("--ckpt", default="")
    a = p.parse_args()
    ftcomm.init_process_group(timeout=30)
    net = torch.nn.Linear(8, 4)
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        if a.case == "unknown_hook":
            ftcomm.register_hook(model, "no_such_hook")
        elif a.case == "twice":
            ftcomm.register_hook(model, "allreduce")
            ftcomm.register_hook(model, "fp16_compress")
        elif a.case == "builtin_first":
            model._register_builtin_comm_hook(dist.BuiltinCommHookType.ALLREDUCE)
            ftcomm.register_hook(model, "allreduce")
        elif a.case == "not_ddp":
            ftcomm.register_hook(net, "allreduce")
        elif a.case == "ft_not_ddp":
            ftcomm.FaultTolerant(net, opt, a.ckpt or "ck")
        elif a.case == "bad_param":
            ftcomm.register_hook(model, "powersgd", rank=0)
        elif a.case == "unknown_param":
            ftcomm.register_hook(model, "powersgd", rnak=2)
        elif a.case == "pinned":
            ftcomm.register_hook(model, "allreduce", pins=["0" * 64])
        elif a.case == "commit_every":
            ftcomm.FaultTolerant(model, opt, a.ckpt or "ck", commit_every=-1)
        elif a.case == "twice_init":
            ftcomm.init_process_group()
        elif a.case == "bad_agreement":
            ftcomm.register_hook(model, "allreduce", agreement="sometimes")
        elif a.case == "per_step_on_gloo":
            # Per step needs the hook's collectives apart from the exchange (NCCL);
            # on Gloo alone the first bucket fails, naming the fix.
            ftcomm.register_hook(model, "allreduce", agreement="per-step")
            model(torch.randn(2, 8)).sum().backward()
        elif a.case == "step_before_resume":
            ftcomm.FaultTolerant(model, opt, a.ckpt).step_done(1)
        else:
            raise SystemExit(f"unknown case {a.case}")
    except Exception as e:  # noqa: BLE001 - the test reads the message
        print(f"CAUGHT {type(e).__name__}: {e}", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
