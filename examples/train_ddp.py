"""A plain PyTorch DDP training script, made fault tolerant by ftcomm.

The five lines marked "# ftcomm" are all it takes: a process group that survives
torchrun restarts, a scripted comm hook inside the Reducer (no GIL), and commits
that a restarted job resumes from, bit-exactly.

    torchrun --nproc-per-node=2 --max-restarts=2 examples/train_ddp.py --ckpt /tmp/ftcomm-example

--fail-at STEP makes rank 1 kill itself (SIGKILL) at that step of the first
attempt, so you can watch torchrun restart the job and ftcomm resume it.
"""
import argparse
import os
import signal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import ftcomm


class TinyTransformer(nn.Module):
    """Classifies a sequence of digits by its sum modulo 10."""

    def __init__(self, vocab=10, dim=64, heads=4, layers=2, seq=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(seq, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x) + self.pos).mean(dim=1))


def make_batch(step, rank, batch, seq=16):
    g = torch.Generator().manual_seed(step * 1009 + rank)  # data follows the step: a resume replays it
    x = torch.randint(0, 10, (batch, seq), generator=g)
    return x, x.sum(dim=1) % 10


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32, help="per rank")
    p.add_argument("--hook", default="powersgd", help="an ftcomm hook name or a .py/.pt file")
    p.add_argument("--ckpt", default="/tmp/ftcomm-example")
    p.add_argument("--commit-every", type=int, default=10)
    p.add_argument("--fail-at", type=int, default=0, help="rank 1 dies at this step on the first attempt")
    a = p.parse_args()

    pg = ftcomm.init_process_group()                                                # ftcomm
    rank = pg.rank()
    torch.manual_seed(rank)
    model = DistributedDataParallel(TinyTransformer())
    params = {"rank": 4, "start_iter": 10} if a.hook == "powersgd" else {}
    hook = ftcomm.register_hook(model, a.hook, **params)                             # ftcomm
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ft = ftcomm.FaultTolerant(model, opt, a.ckpt, commit_every=a.commit_every, hook=hook)  # ftcomm
    step = ft.resume()                                                               # ftcomm
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    while step < a.steps:
        x, y = make_batch(step, rank, a.batch)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        ft.step_done(step)                                                           # ftcomm
        if rank == 0 and step % 20 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
        if a.fail_at == step and rank == 1 and first_attempt:
            print(f"rank 1: killing itself at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    ft.close()
    if rank == 0:
        digest = ftcomm.digest(list(model.parameters()))
        print(f"done: {step} steps, parameter digest {digest}", flush=True)


if __name__ == "__main__":
    main()
