"""ftcomm: fault-tolerant gradient communication for PyTorch's DistributedDataParallel.

Five added lines give a plain DDP script scripted comm hooks that run inside the
Reducer without the GIL, and bit-exact recovery under ``torchrun --max-restarts``::

    import ftcomm
    ftcomm.init_process_group()                       # instead of dist.init_process_group
    model = torch.nn.parallel.DistributedDataParallel(net)
    hook = ftcomm.register_hook(model, "powersgd", rank=4, start_iter=2)
    ft = ftcomm.FaultTolerant(model, optimizer, "ckpt/", commit_every=10, hook=hook)
    step = ft.resume()                                # 0 on a fresh job
    while step < total_steps:
        ...                                           # forward, backward, optimizer.step()
        step += 1
        ft.step_done(step)                            # commits when due
    ft.close()
"""
import os as _os

import torch as _torch  # loads libtorch before the extension
import torch.distributed as _dist  # registers c10d's Python types the extension uses

_here = _os.path.dirname(_os.path.abspath(__file__))
if _os.path.isdir(_os.path.join(_here, "hooks_ts")):
    # The library hooks shipped with this package (FTCOMM_HOOKS_DIR overrides).
    _os.environ.setdefault("FTCOMM_HOOKS_DIR", _os.path.join(_here, "hooks_ts"))

from .errors import FtcommError, HookError, ResumeRefused, StoreError  # noqa: E402  (before _C, which raises them)
from . import _C  # noqa: E402
from .fault_tolerant import FaultTolerant  # noqa: E402
from .hooks import Hook, hook_check, list_hooks, register_hook  # noqa: E402
from .process_group import init_process_group  # noqa: E402

__version__ = _C.__version__


def digest(tensors) -> str:
    """SHA-256 hex of the tensors' bytes, in order (the digest ``ftcomm train`` prints):
    equal digests mean bit-identical tensors."""
    return _C.tensors_digest([t.detach() for t in tensors])


__all__ = [
    "FaultTolerant",
    "FtcommError",
    "HookError",
    "ResumeRefused",
    "StoreError",
    "digest",
    "Hook",
    "hook_check",
    "init_process_group",
    "list_hooks",
    "register_hook",
    "__version__",
]
