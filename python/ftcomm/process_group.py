"""A default process group that survives torchrun restarts."""
from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from . import _C


def _seconds(timeout: float | timedelta) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, timedelta)):
        raise TypeError(f"timeout must be seconds (a number) or a timedelta, got {timeout!r}")
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    if not (0 < seconds < 1e9):  # also refuses inf and nan
        raise ValueError(f"timeout must be positive seconds, finite and below 1e9, got {timeout!r}")
    return seconds


def init_process_group(backend: str = "auto", timeout: float | timedelta = 300.0) -> dist.ProcessGroup:
    """Sets the default process group (the one DDP uses), from torchrun's environment.

    Use it instead of ``torch.distributed.init_process_group``. Its store keys are
    namespaced by torchrun's restart count, so a restarted attempt never reads the
    keys of a dead one (with the plain call, a restarted Gloo job can connect to the
    dead attempt's addresses or hang).

    Args:
        backend: ``"auto"`` (Gloo for CPU tensors; NCCL for CUDA tensors when every
            rank has a GPU of its own and torch has NCCL, else Gloo), ``"nccl"``
            (the same, but an error instead of the fallback) or ``"gloo"``.
        timeout: seconds (or a timedelta) for the store, the rendezvous and every
            collective; a rank that waits longer fails instead of hanging.

    Returns:
        The default group (``torch.distributed.group.WORLD``).

    Outside torchrun it forms a group of one (RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT are read when set). Rank 0 prints the choice in one line on stderr.
    Whether NCCL can be used is agreed by all ranks before NCCL is initialised; an
    NCCL initialisation that fails after that is an error, not a fallback.
    """
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"unknown backend {backend!r}; use 'auto', 'nccl' or 'gloo'")
    if dist.is_initialized():
        raise RuntimeError(
            "a default process group already exists; call ftcomm.init_process_group() once, "
            "instead of torch.distributed.init_process_group()"
        )
    seconds = _seconds(timeout)
    store, rank, world, local_rank, restart, _ = _C.torchrun_store(seconds)

    failure = "gloo asked for"
    device = -1
    if backend != "gloo":
        # The same decision as ftcomm's C++ group (process_group.h: nccl_candidate).
        device, local = _C.nccl_candidate(rank, local_rank, "" if dist.is_nccl_available() else "this torch has no NCCL")
        failure = _C.agree_nccl_usable(store, rank, world, local, device)
        if backend == "nccl" and failure:
            raise RuntimeError(f"backend 'nccl' could not be used: {failure}. Fix the NCCL environment or use "
                               "backend='gloo' or 'auto'")
    pg_store = dist.PrefixStore("pg", store)
    if not failure:
        torch.cuda.set_device(device)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl", store=pg_store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=seconds), device_id=torch.device("cuda", device))
        cuda = "nccl"
    else:
        dist.init_process_group(backend="gloo", store=pg_store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=seconds))
        has_gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
        cuda = f"gloo ({failure})" if has_gpu else "none (no GPU)"
    if rank == 0:
        print(f"ftcomm: process group of {world} ranks [attempt {restart}]: cpu->gloo, cuda->{cuda}, "
              f"timeout {seconds:g}s", file=sys.stderr, flush=True)
    return dist.group.WORLD
