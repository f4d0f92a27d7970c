"""Pins this rank to a share of the host's cores before torch starts any thread.

Ranks of a CPU benchmark that share a host's cores freely move between them and
take turns with each other's intra-op and Gloo threads; the step times then spread
more than the differences being measured. With FTCOMM_BENCH_PIN=1 each local rank
gets its own contiguous slice of the cores this process may use (LOCAL_RANK of
LOCAL_WORLD_SIZE, as torchrun sets them); every thread started later, torch's and
Gloo's included, inherits it. Import this module before torch.
"""
import os


def pin_this_rank():
    """Returns the cores this rank was pinned to, or None when pinning is off."""
    if os.environ.get("FTCOMM_BENCH_PIN", "0") in ("", "0"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = len(cores) // world
    if share < 1:
        raise SystemExit(f"FTCOMM_BENCH_PIN=1: {world} ranks on {len(cores)} cores leave none to pin; "
                         "unset FTCOMM_BENCH_PIN or run fewer ranks")
    mine = cores[rank * share:(rank + 1) * share]
    os.sched_setaffinity(0, mine)
    return mine


PINNED = pin_this_rank()
