"""Scenarios of issue 28 for the Python package, one per --case, under torchrun.

Each prints "RESULT <json>" on rank 0 when it gets to its end (what the test
checks), and takes --ckpt (the stores' root) and --phase (which of a case's runs
this is)."""
import argparse
import json
import os
import resource
import signal
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import ftcomm


class BnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.fc(x))))


def data(step, rank):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 6, generator=g), torch.randint(0, 2, (8,), generator=g)


def train_steps(model, opts, ft, start, stop, on_step=None):
    step = start
    while step < stop:
        x, y = data(step, ft.rank)
        loss = F.cross_entropy(model(x), y)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        step += 1
        if on_step:
            on_step(step)
        ft.step_done(step)
    return step


def result(rank, **values):
    if rank == 0:
        print("RESULT " + json.dumps(values), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--case", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--phase", type=int, default=0)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    ftcomm.init_process_group(timeout=30)
    torch.manual_seed(7)
    net = BnNet()
    model = DistributedDataParallel(net, find_unused_parameters=a.case == "find_unused")
    rank = model.process_group.rank()

    if a.case == "bn_resize":
        # Phase 0 trains at world 2; phase 1 resumes at world 1 (or 3): the
        # BatchNorm statistics carry over instead of going back to their initial values.
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ft = ftcomm.FaultTolerant(model, opt, a.ckpt, commit_every=2)
        step = ft.resume()
        resumed = {k: v.tolist() for k, v in net.bn.state_dict().items()}
        if a.phase == 0:
            step = train_steps(model, [opt], ft, step, a.steps)
        ft.close()
        result(rank, step=step, bn=resumed, bn_end={k: v.tolist() for k, v in net.bn.state_dict().items()},
               report=ft.report)

    elif a.case == "user_tensor_in_place":
        # The counter is bumped in place at the start of each step, before a
        # failure in step 6: the just-in-time save of step 5 must hold 5, not 6.
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        user = {"counter": torch.zeros((), dtype=torch.int64)}
        ft = ftcomm.FaultTolerant(model, opt, a.ckpt, commit_every=0, user_state=user)
        step = ft.resume()
        if a.phase == 0:
            with ft:
                while step < 10:
                    user["counter"] += 1
                    if step == 5:
                        raise RuntimeError("injected failure in step 6")
                    step = train_steps(model, [opt], ft, step, step + 1)
        result(rank, step=step, counter=int(user["counter"]))
        ft.close()

    elif a.case == "continue_without_periodic":
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        ft = ftcomm.FaultTolerant(model, opt, a.ckpt, commit_every=0)
        start = ft.resume()
        step = train_steps(model, [opt], ft, start, a.steps)
        ft.close()
        result(rank, start=start, step=step, digest=ftcomm.digest(list(net.state_dict().values())))

    elif a.case in ("sigterm_handler_after", "sigterm_handler_before"):
        marker = os.path.join(a.ckpt, "handler-ran")

        def handler(signum, frame):
            with open(marker, "w") as f:
                f.write(str(signum))
            sys.exit(7)

        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if a.case.endswith("before"):
            signal.signal(signal.SIGTERM, handler)
        ft = ftcomm.FaultTolerant(model, opt, a.ckpt, commit_every=0)
        step = ft.resume()
        if a.phase == 0:
            if a.case.endswith("after"):
                signal.signal(signal.SIGTERM, handler)
                time.sleep(0.3)  # the watcher puts its handler back in front (it looks every 50 ms)
            step = train_steps(model, [opt], ft, step, 3)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(20)  # the save, then the handler's sys.exit(7)
            print("the handler never ran", flush=True)
            return 1
        result(rank, step=step, report=ft.report)
        ft.close()

    elif a.case == "two_optimizers":
        body = torch.optim.SGD(list(net.fc.parameters()) + list(net.bn.parameters()), lr=0.1, momentum=0.9)
        head = torch.optim.Adam(net.out.parameters(), lr=0.01)
        ft = ftcomm.FaultTolerant(model, [body, head], a.ckpt, commit_every=2)
        step = ft.resume()
        saved = None
        if a.phase == 0:
            step = train_steps(model, [body, head], ft, step, a.steps)
        state = [v for o in (body, head) for s in o.state_dict()["state"].values() for v in s.values()
                 if torch.is_tensor(v)]
        ft.close()
        result(rank, step=step, optimizer_digest=ftcomm.digest(state), tensors=len(state), saved=saved)

    elif a.case == "optimizer_swapped":
        params = model.parameters()
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9) if a.phase == 0 else torch.optim.Adam(params, lr=0.1)
        ft = ftcomm.FaultTolerant(model, opt, a.ckpt, commit_every=2)
        step = ft.resume()
        step = train_steps(model, [opt], ft, step, a.steps)
        ft.close()
        result(rank, step=step)

    elif a.case == "user_state_differs":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ft = ftcomm.FaultTolerant(model, opt, a.ckpt, commit_every=2, user_state={"cursor": rank * 10})
        step = ft.resume()
        train_steps(model, [opt], ft, step, a.steps)
        ft.close()

    elif a.case in ("paused_evaluation", "unpaused_evaluation"):
        # stall_timeout 1.5 s; a 3 s evaluation between steps 2 and 3.
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ft = ftcomm.FaultTolerant(model, opt, a.ckpt, commit_every=0, stall_timeout=1.5)
        step = ft.resume()

        def evaluate(at):
            if at != 2:
                return
            if a.case == "paused_evaluation":
                with ft.paused():
                    time.sleep(3)
            else:
                time.sleep(3)

        step = train_steps(model, [opt], ft, step, a.steps, on_step=evaluate)
        ft.close()
        result(rank, step=step)

    elif a.case == "find_unused":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        hook = ftcomm.register_hook(model, "allreduce")
        ft = ftcomm.FaultTolerant(model, opt, a.ckpt, commit_every=2, hook=hook)
        step = train_steps(model, [opt], ft, ft.resume(), a.steps)
        ft.close()
        result(rank, step=step, digest=ftcomm.digest(list(net.parameters())))

    elif a.case == "jit_save_disk_full":
        # The just-in-time save hits the file-size limit: one line says so, no
        # C++ stack trace.
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ft = ftcomm.FaultTolerant(model, opt, a.ckpt, commit_every=0)
        step = ft.resume()
        step = train_steps(model, [opt], ft, step, 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
        with ft:
            raise RuntimeError("injected failure after step 2")

    else:
        raise SystemExit(f"unknown case {a.case}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
