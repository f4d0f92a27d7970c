"""World 1 under torchrun: one FaultTolerant commit with --direct-writes on or off,
then prints how many of the blob's pages are in the page cache (mincore) and
whether the snapshot reads back bit-exact."""
import argparse
import ctypes
import mmap
import os

import torch
from torch.nn.parallel import DistributedDataParallel

import ftcomm


def cached_pages(path):
    """(pages of the file in the page cache, pages of the file)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap " + path)
        try:
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore " + path)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec), pages


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--direct-writes", choices=["on", "off"], required=True)
    a = p.parse_args()
    ftcomm.init_process_group(timeout=60)
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ft = ftcomm.FaultTolerant(model, opt, a.ckpt, commit_every=1, jit=False,
                              direct_writes=a.direct_writes == "on")
    ft.resume()
    model(torch.randn(4, 512)).sum().backward()
    opt.step()
    ft.step_done(1)
    ft.flush()
    blobs = os.path.join(ft.ckpt_dir, "blobs")
    blob = os.path.join(blobs, sorted(os.listdir(blobs))[-1])
    cached, pages = cached_pages(blob)
    ft.close()
    del ft  # its store's lock goes with it
    other = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512)))
    other_opt = torch.optim.Adam(other.parameters(), lr=1e-3)
    ft2 = ftcomm.FaultTolerant(other, other_opt, a.ckpt, commit_every=1, jit=False)
    resumed = ft2.resume()
    same = resumed == 1 and all(torch.equal(x, y) for x, y in zip(model.parameters(), other.parameters()))
    ft2.close()
    print(f"RESULT cached={cached} pages={pages} same={same}", flush=True)


if __name__ == "__main__":
    main()
