"""Scripted comm hooks on PyTorch's DistributedDataParallel."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import _C


class Hook:
    """A TorchScript comm hook running inside a DDP model's Reducer (no Python, no GIL).

    Made by :func:`register_hook`. Every rank runs the same hook (its digest was
    agreed); a hook that fails or returns a bad result on some ranks fails (or,
    with ``on_error="fallback"``, falls back to a mean allreduce) on all of them.
    """

    def __init__(self, impl: _C.Hook):
        self._impl = impl

    @property
    def name(self) -> str:
        return self._impl.name

    @property
    def path(self) -> str:
        return self._impl.path

    @property
    def digest(self) -> str:
        """SHA-256 of the hook's source, agreed by every rank."""
        return self._impl.digest

    @property
    def params(self) -> dict:
        return dict(self._impl.params)

    @property
    def agreement(self) -> str:
        """The agreement in force: ``"per-step"``, ``"per-collective"`` or ``"off"`` once the
        first bucket ran (``"auto"`` resolves then, from the bucket's device and backend)."""
        return self._impl.agreement

    @property
    def fallbacks(self) -> int:
        """Buckets reduced by the fallback allreduce because the hook failed somewhere."""
        return self._impl.fallbacks

    @property
    def busy_seconds(self) -> float:
        """Seconds spent running the hook (its compute and collectives)."""
        return self._impl.busy_seconds

    @property
    def replicated_state(self) -> list:
        return list(self._impl.replicated_state)

    @property
    def local_state(self) -> list:
        return list(self._impl.local_state)

    def __repr__(self) -> str:
        return f"ftcomm.Hook({self.name!r}, digest={self.digest[:12]}, params={self.params})"


def _check_cpu_backend(pg: dist.ProcessGroup) -> None:
    try:
        pg._get_backend(torch.device("cpu"))
    except Exception:
        raise RuntimeError(
            "ftcomm's hooks agree across ranks with small CPU collectives, and this model's process group has no "
            "CPU backend; create it with ftcomm.init_process_group() or backend='cpu:gloo,cuda:nccl'"
        ) from None


def register_hook(model: DistributedDataParallel, hook: str, *, pins: Iterable[str] = (), on_error: str = "fail",
                  hook_timeout: Optional[float] = None, agreement: str = "auto", **params) -> Hook:
    """Runs a TorchScript comm hook inside ``model``'s Reducer. Collective.

    Args:
        model: a ``torch.nn.parallel.DistributedDataParallel`` model without a comm hook.
        hook: a library hook's name (``ftcomm.list_hooks()``), or a ``.py`` / ``.pt`` file.
        pins: when given, the hook's SHA-256 digest must be one of these.
        on_error: ``"fail"`` (every rank raises, naming the hook and the failing rank)
            or ``"fallback"`` (every rank reduces that bucket with a mean allreduce).
        hook_timeout: seconds one hook call may take before it fails on every rank; 0: unbounded.
            Default: half the process group's timeout (30 s when the group does not report
            one), so the hook's own error, naming it, comes before the collective's.
        A hook file is code, as trusted as the training script: TorchScript can read
        and write files (``torch.from_file``), and the hook runs when it is loaded
        (its declarations) and at every bucket. Load hooks only from places as
        trusted as the script itself; ``pins`` makes every rank refuse a hook
        whose digest is not one you reviewed.
        With ``find_unused_parameters=True`` the hook gets a process group of its own
        (made here, collectively), apart from the Reducer's own collectives.
        agreement: how a hook failing on some ranks only is made to fail (or fall back) on
            all of them, so that no rank waits on a collective the others never join:
            ``"auto"`` (the default: with ``on_error="fail"``, ``"per-step"`` for CUDA buckets
            on NCCL and ``"fail-fast"`` for CPU buckets; else ``"per-collective"``);
            ``"fail-fast"`` (nothing per collective: a failing rank records hook, rank,
            bucket and reason in the group's store, and a peer whose collective is slow
            or broken finds it there and raises the same error; the group is unusable
            afterwards: restart the job, :class:`FaultTolerant` resumes it); ``"per-collective"`` (a small
            Gloo exchange before each of the hook's collectives and after each bucket; the
            group stays usable; needed for ``on_error="fallback"``); ``"per-step"`` (the
            hook's NCCL collectives go straight to the stream, one exchange per step after
            the last bucket, and on a failure every rank aborts its NCCL communicator and
            raises: restart the job, :class:`FaultTolerant` resumes it); ``"off"`` (trusted
            hooks only: a failure on one rank leaves its peers waiting until the group's
            timeout).
        **params: the hook's parameters, e.g. ``rank=4, start_iter=2`` for powersgd.

    Returns:
        The :class:`Hook`: its digest, parameters and fallback count. Pass it to
        :class:`FaultTolerant` so its state is saved and restored.
    """
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(f"register_hook needs a torch.nn.parallel.DistributedDataParallel model, got "
                        f"{type(model).__name__}; wrap it first: DistributedDataParallel(model)")
    if getattr(model, "_ftcomm_hook", None) is not None or model._comm_hooks:
        raise RuntimeError("this DDP model already has a comm hook; DDP runs one hook per model "
                           "(register it once, before training)")
    if isinstance(pins, (str, bytes)):
        raise TypeError(f"pins must be a list of SHA-256 digests, got the string {pins!r}; write pins=[{pins!r}]")
    if hook_timeout is not None and (isinstance(hook_timeout, bool) or not isinstance(hook_timeout, (int, float))
                                     or not math.isfinite(hook_timeout) or not 0 <= hook_timeout < 1e9):
        raise ValueError(f"hook_timeout must be 0 (unbounded) or positive seconds (finite, below 1e9), got "
                         f"{hook_timeout!r}")
    pg = model.process_group
    _check_cpu_backend(pg)
    if model.find_unused_parameters:
        # With find_unused_parameters the Reducer allreduces its used-parameter
        # map on the model's group from the autograd thread while the hook's
        # worker runs collectives: on one group their order would differ
        # between ranks (Gloo aborts). The hook gets a group of its own.
        pg = dist.new_group(ranks=dist.get_process_group_ranks(pg), backend=dist.get_backend(pg))
    impl = _C.load_hook(pg, str(hook), {str(k): _param(k, v) for k, v in params.items()}, list(pins), on_error,
                        None if hook_timeout is None else float(hook_timeout), str(agreement))
    try:
        impl.attach(model.reducer)
    except RuntimeError as e:
        if "only be called once" in str(e):
            raise RuntimeError("this DDP model already has a comm hook (a built-in one?); DDP runs one hook per "
                               "model") from None
        raise
    handle = Hook(impl)
    model._ftcomm_hook = handle
    return handle


def _param(name: str, value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"hook parameter {name}={value!r}: give a number")
    return repr(float(value)) if isinstance(value, float) else str(value)


def list_hooks() -> list:
    """The library hooks' names."""
    return list(_C.list_hooks())


def hook_check(hook: str, *, world_size: int = 2, numel: int = 1 << 14, steps: int = 3, hook_timeout: float = 30.0,
               **params) -> dict:
    """``ftcomm hook check`` from Python: runs ``hook`` on synthetic buckets over a real
    Gloo group of ``world_size`` threads and checks every result's shape, dtype,
    device and finiteness. Raises naming the hook and the first problem; returns
    what it checked (name, digest, state, parameters, buckets checked)."""
    return dict(_C.hook_check(str(hook), int(world_size), int(numel), int(steps),
                              {str(k): str(v) for k, v in params.items()}, float(hook_timeout)))
