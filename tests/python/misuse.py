"""Every argument misuse of the Python API that is refused before any collective,
one after another in one process (a world of one under torchrun): prints
"CASE <name>: CAUGHT <type>: <message>" or "CASE <name>: ACCEPTED" for each."""
import math
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

import ftcomm


def cases(ckpt):
    net = torch.nn.Linear(8, 4)
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    made = []

    def ft(**kw):  # a store of its own each: an earlier case's may still be open
        made.append(1)
        return ftcomm.FaultTolerant(model, opt, os.path.join(ckpt, f"ft{len(made)}"), **kw)

    def resumed():
        f = ft(commit_every=0, jit=False)
        f.resume()
        return f

    def twice():
        f = resumed()
        f.step_done(1)
        f.step_done(1)

    def back():
        f = resumed()
        f.step_done(2)
        f.step_done(1)

    def fresh_model_with_hook(**params):
        m = DistributedDataParallel(torch.nn.Linear(8, 4))
        return ftcomm.register_hook(m, "powersgd", **params)

    half = torch.nn.Linear(8, 4)
    half_model = DistributedDataParallel(torch.nn.Sequential(half, torch.nn.Linear(4, 2)))
    only_first = torch.optim.SGD(half.parameters(), lr=0.1)

    return {
        "user_state_list": lambda: ft(user_state=[1, 2]),
        "step_negative": lambda: resumed().step_done(-2),
        "step_float": lambda: resumed().step_done(2.0),
        "step_str": lambda: resumed().step_done("2"),
        "step_huge": lambda: resumed().step_done(2 ** 63),
        "step_twice": twice,
        "step_back": back,
        "job_id_newline": lambda: ft(job_id="a\nb"),
        "job_id_empty": lambda: ft(job_id=""),
        "update_grace_inf": lambda: ft(update_grace=math.inf),
        "stall_timeout_nan": lambda: ft(stall_timeout=math.nan),
        "allow_changed_str": lambda: ft(allow_changed_settings="lr"),
        "pins_str": lambda: fresh_model_with_hook(pins="0" * 64),
        "powersgd_rank_fraction": lambda: fresh_model_with_hook(rank=2.5),
        "hook_timeout_inf": lambda: ftcomm.register_hook(DistributedDataParallel(torch.nn.Linear(8, 4)), "allreduce",
                                                         hook_timeout=math.inf),
        "second_optimizer_missing": lambda: ftcomm.FaultTolerant(half_model, only_first, os.path.join(ckpt, "h")),
        "user_state_unsafe_class": lambda: (lambda f: (f.resume(), f.user_state.update(when=Unsafe()), f.step_done(1)))(
            ft(commit_every=1, jit=False, user_state={})),
        "init_timeout_inf": lambda: ftcomm.process_group._seconds(math.inf),
    }


class Unsafe:
    """A user class: checkpoints hold plain values only."""


def main():
    ckpt = sys.argv[1]
    ftcomm.init_process_group(timeout=30)
    for name, case in cases(ckpt).items():
        try:
            case()
            print(f"CASE {name}: ACCEPTED", flush=True)
        except Exception as e:  # noqa: BLE001 - the test reads the message
            text = str(e).replace("\n", " ")
            print(f"CASE {name}: CAUGHT {type(e).__name__}: {text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
