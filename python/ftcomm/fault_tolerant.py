"""Bit-exact recovery for PyTorch's DistributedDataParallel."""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import _C, _state, process_group
from .hooks import Hook


class FaultTolerant:
    """Commits a DDP job's state to one RocksDB store per rank and resumes it bit-exactly.

    What is saved at each commit, and restored by :meth:`resume`:

    * the model's parameters (replicated) and buffers (BatchNorm statistics included;
      rank-local, as each rank updates them with its own batch after DDP's broadcast);
    * the optimizer's full ``state_dict`` (its tensors, and the numbers and lists of
      ``param_groups``);
    * the hook's replicated and rank-local state (e.g. PowerSGD's error feedback);
    * torch's CPU RNG state and, when the model is on a GPU, that GPU's RNG state
      (rank-local: rank r + the ranks per node keeps a byte-exact copy of rank r's
      rank-local state, on the next node);
    * ``user_state``, the trainer's own small state (a data position, a scheduler's
      ``state_dict()``, an epoch): picklable values and tensors, the same on every rank;
    * the Reducer's bucket layout, which a resume reuses.

    Just in time (``jit=True``, the default): at a failure each surviving rank
    saves the state of its last finished step to its store, without any
    collective, and exits; the restarted job resumes there, so a failure costs at
    most the step in progress even with ``commit_every=0``. A survivor finds out
    by a collective error (a dead Gloo peer; the exception that leaves the
    script is caught by ``sys.excepthook``, or by ``with ft:``), by a step that
    stalls past ``stall_timeout`` (a hung peer or NCCL collective), or by
    torchrun's SIGTERM (caught in C++; it then saves and exits with 143, within
    torchrun's 30 s before SIGKILL). The last finished step is the one of the
    last ``step_done``; from ``optimizer.step()`` (a pre-hook marks it) until
    the next ``step_done`` the state is half-updated, and a failure there saves
    nothing (a SIGTERM waits up to ``update_grace`` for ``step_done``). The same
    pre-hook sends the step's rank-local state (RNG, buffers: final once backward
    is done) to the buddy, one small collective per step.
    ``jit_policy`` says what a resume does when the failed rank's rank-local
    state exists only at an older commit: ``"exact"`` resumes from the newest
    step where every rank's exists (bit-identical), ``"reset"`` from the newest
    step with that state started afresh. With that per-step buddy copy,
    ``exact`` loses at most one step unless the hook keeps rank-local state
    (PowerSGD's, top-k's error feedback), whose buddy copy comes only with
    periodic commits.

    On :meth:`resume`, the ranks agree on the newest step some rank holds intact
    (damaged snapshots are skipped); ranks that lack it (a replaced rank with an
    empty disk) get it from a peer with ``broadcast_coalesced``; rank-local state
    comes from the rank's own store or its buddy's copy. A job resumed at another
    world size (torchrun ``--nnodes MIN:MAX`` after a node is lost, or grown
    again) carries parameters, buffers, optimizer and replicated hook state over
    and starts every rank's rank-local state afresh (``report["resumed_world_size"]``
    says so); the data sharding is the script's (a ``DistributedSampler`` follows
    the new world size). A store of another job, a damaged store, and changed
    settings are refused with an error that names the problem and the fix.

    Args:
        model: the DDP model (a hook, if any, registered with :func:`ftcomm.register_hook`).
        optimizer: its optimizer.
        ckpt_dir: the stores' directory (on each node its own disk); rank r uses
            ``<ckpt_dir>/rank<r>``, or takes over a store there of a rank the node no
            longer runs (the rendezvous numbered the node's workers anew).
        commit_every: a snapshot every K steps (0: none).
        hook: the :class:`ftcomm.Hook` of ``model``, whose state is saved (default:
            the one registered on ``model``).
        keep_snapshots: how many snapshots each store keeps.
        job_id: the job's name; a store written under another is refused.
        settings: name -> value of what changes the result (learning rate, batch, ...);
            a resume with other values is refused unless the name (or ``"all"``) is
            in ``allow_changed_settings``. Hook parameters are recorded as ``hook.<name>``.
        user_state: the trainer's own dict; :meth:`resume` updates it in place.
        jit: just-in-time commits at a failure (above).
        jit_policy: ``"exact"`` or ``"reset"`` (above).
        stall_timeout: seconds a step may run before it counts as stalled (save,
            then exit 1); default 0.9 x the timeout of :func:`ftcomm.init_process_group`
            (none when the group was made otherwise); 0: never.
        update_grace: seconds a SIGTERM waits for an optimizer step in progress.
    """

    def __init__(self, model: DistributedDataParallel, optimizer: torch.optim.Optimizer, ckpt_dir: str, *,
                 commit_every: int = 10, hook: Optional[Hook] = None, keep_snapshots: int = 2,
                 job_id: str = "ftcomm", settings: Optional[dict] = None,
                 allow_changed_settings: Iterable[str] = (), user_state: Optional[dict] = None,
                 jit: bool = True, jit_policy: str = "exact", stall_timeout: Optional[float] = None,
                 update_grace: float = 10.0):
        if not isinstance(model, DistributedDataParallel):
            raise TypeError(f"FaultTolerant needs a torch.nn.parallel.DistributedDataParallel model, got "
                            f"{type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"FaultTolerant needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(commit_every, bool) or not isinstance(commit_every, int) or commit_every < 0:
            raise ValueError(f"commit_every must be a whole number of steps, 0 or more; got {commit_every!r}")
        if jit_policy not in ("exact", "reset"):
            raise ValueError(f"jit_policy must be 'exact' or 'reset', got {jit_policy!r}")
        if stall_timeout is None:
            stall_timeout = 0.9 * process_group.group_timeout_s if process_group.group_timeout_s else 0.0
        if isinstance(stall_timeout, bool) or not isinstance(stall_timeout, (int, float)) or stall_timeout < 0:
            raise ValueError(f"stall_timeout must be 0 (never) or positive seconds, got {stall_timeout!r}")
        if isinstance(update_grace, bool) or not isinstance(update_grace, (int, float)) or update_grace < 0:
            raise ValueError(f"update_grace must be 0 or more seconds, got {update_grace!r}")
        if not ckpt_dir:
            raise ValueError("ckpt_dir is empty; give the directory the ranks' stores live in")
        self.model = model
        self.optimizer = optimizer
        self.hook = hook if hook is not None else getattr(model, "_ftcomm_hook", None)
        self.user_state = user_state if user_state is not None else {}
        self.report: dict = {}
        pg = model.process_group
        self.rank = pg.rank()
        self.world_size = pg.size()
        # torchrun gives a node's workers consecutive ranks; after a rendezvous
        # numbers them anew, a rank takes over a store this node keeps for a rank
        # it no longer runs (its replicated state is the job's).
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.ckpt_dir = _C.rank_store_dir(os.fspath(ckpt_dir), self.rank, local_rank, local_world)
        self._params = model._build_params_for_reducer()[0]
        self._device = next((p.device for p in self._params if p.device.type == "cuda"), None)
        self._resumed = False
        self._ckpt = _C.Checkpointer(pg, self.ckpt_dir, str(job_id), commit_every, int(keep_snapshots),
                                     {str(k): _setting(v) for k, v in (settings or {}).items()},
                                     set(map(str, allow_changed_settings)), bool(jit), jit_policy,
                                     float(stall_timeout), float(update_grace))
        self._update_handle = None
        self._previous_excepthook = None

    # --- what is saved ---------------------------------------------------------
    def _buffers(self) -> list:
        # Everything in the module's state_dict that the Reducer does not train:
        # buffers, and frozen parameters.
        ids = {id(p) for p in self._params}
        named = self.model.module.state_dict(keep_vars=True)
        return [t.detach() for t in named.values() if id(t) not in ids]

    def _rng(self) -> list:
        rng = [torch.get_rng_state()]
        if self._device is not None:
            rng.append(torch.cuda.get_rng_state(self._device))
        return rng

    def _rank_local(self) -> list:
        return self._rng() + self._buffers()

    def _c_state(self) -> _C.State:
        state = _C.State()
        state.parameters = self._params
        state.objects = _state.pack({"optimizer": self.optimizer.state_dict(), "user": self.user_state})
        state.rank_local = self._rank_local()
        state.hook = self.hook._impl if self.hook is not None else None
        return state

    # --- the protocol ------------------------------------------------------------
    def resume(self) -> int:
        """Collective, once, before the first step: restores the newest step the job can
        resume from and returns it (0 on a fresh job). ``self.report`` says what
        happened (resumed step, resynced ranks, bytes, times, rank-local state)."""
        if self._resumed:
            raise RuntimeError("FaultTolerant.resume() runs once, before the first step")
        self._resumed = True
        with torch.no_grad():
            report, objects, rank_local = self._ckpt.resume(self._c_state(), self.model.reducer)
        self.report = dict(report)
        step = self.report["resumed_from_step"]
        if step >= 0:
            parts = _state.unpack(list(objects))
            self.optimizer.load_state_dict(parts["optimizer"])
            self.user_state.clear()
            self.user_state.update(parts["user"])
            torch.set_rng_state(rank_local[0].cpu())
            if self._device is not None:
                torch.cuda.set_rng_state(rank_local[1].cpu(), self._device)
            rng_count = 1 if self._device is None else 2  # as _rng() lays them out
            for mine, saved in zip(self._buffers(), rank_local[rng_count:]):
                mine.copy_(saved)
        if self._ckpt.jit_active:
            self._arm_just_in_time()
        if self.rank == 0:
            r = self.report
            if step < 0:
                print(f"ftcomm: fresh start ({self.world_size} ranks, stores under {os.path.dirname(self.ckpt_dir)})",
                      file=sys.stderr, flush=True)
            else:
                resynced = f", resynced ranks {r['resynced_ranks']} ({r['resync_bytes']} bytes)" \
                    if r["resynced_ranks"] else ""
                jit = " (a just-in-time commit)" if r["resumed_just_in_time"] else ""
                if r["resumed_world_size"] != self.world_size:
                    jit += (f", written at world size {r['resumed_world_size']}: resized to {self.world_size}, "
                            "rank-local state started afresh")
                print(f"ftcomm: resumed from step {step}{jit}{resynced}; {r['steps_lost']} step(s) behind the newest "
                      f"saved (policy {r['policy']}); rank-local state: {r['local_state']}; "
                      f"agreement {r['agreement_ms']:.1f} ms, load {r['load_ms']:.1f} ms, "
                      f"resync {r['resync_ms']:.1f} ms", file=sys.stderr, flush=True)
        return max(step, 0)

    def step_done(self, step: int) -> bool:
        """Collective when due: call after ``optimizer.step()`` of step ``step`` (1, 2, ...).
        Every ``commit_every`` steps it snapshots the state (copied to host now,
        written in the background; the previous snapshot is waited for first).
        Returns whether it committed."""
        if not self._resumed:
            raise RuntimeError("call FaultTolerant.resume() before the first step")
        jit = self._ckpt.jit_active
        if not jit and not self._ckpt.due(step):
            return False
        with torch.no_grad():
            state = self._c_state()
            if jit:
                self._ckpt.step_finished(step, state, self.model.reducer, step)
            if not self._ckpt.due(step):
                return False
            return self._ckpt.commit(step, state, self.model.reducer, step)

    def save_just_in_time(self, reason: str = "requested") -> bool:
        """Saves the last finished step now, without any collective (what a failure
        does). Returns whether a commit was written: not when the store already
        holds that step, when jit is off, or mid-update."""
        return self._ckpt.save_just_in_time(str(reason))

    # --- just in time ------------------------------------------------------------
    def _arm_just_in_time(self) -> None:
        self._update_handle = self.optimizer.register_step_pre_hook(_BeginUpdate(self))
        self._previous_excepthook = sys.excepthook
        sys.excepthook = _SaveOnError(self._ckpt, self._previous_excepthook)

    def _disarm_just_in_time(self) -> None:
        if self._update_handle is not None:
            self._update_handle.remove()
            self._update_handle = None
        if self._previous_excepthook is not None:
            if isinstance(sys.excepthook, _SaveOnError):
                sys.excepthook = self._previous_excepthook
            self._previous_excepthook = None

    def commits(self) -> list:
        """This rank's commits, oldest first (step, world size, layout, snapshot bytes, settings)."""
        return [dict(c) for c in self._ckpt.commits()]

    def flush(self) -> None:
        """Waits for the snapshot in flight; raises its error."""
        self._ckpt.flush()

    def close(self) -> None:
        """Waits for the snapshot in flight and stops just-in-time saving (call at the end
        of training; a SIGTERM after it is no longer caught)."""
        self._disarm_just_in_time()
        self._ckpt.stop_just_in_time()
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and self._ckpt.jit_active and not isinstance(exc, (KeyboardInterrupt, GeneratorExit)):
            self._ckpt.save_just_in_time(_reason(exc))
        self.close()
        return False


class _BeginUpdate:
    """Optimizer step pre-hook: the state stops being the last finished step's; the
    step's rank-local state (RNG, buffers), final once backward is done, goes to
    the buddy first."""

    def __init__(self, ft):
        self._ft = ft

    def __call__(self, optimizer, args, kwargs):
        self._ft._ckpt.begin_update(self._ft._rank_local())


class _SaveOnError:
    """sys.excepthook: an error leaving the script (a dead peer's collective error)
    saves the last finished step before the traceback is printed."""

    def __init__(self, ckpt, previous):
        self._ckpt, self._previous = ckpt, previous

    def __call__(self, exc_type, exc, tb):
        if not issubclass(exc_type, KeyboardInterrupt):
            try:
                self._ckpt.save_just_in_time(_reason(exc))
            except Exception as save_error:  # noqa: BLE001 - the original error matters more
                print(f"ftcomm: the just-in-time save failed: {save_error}", file=sys.stderr, flush=True)
        self._previous(exc_type, exc, tb)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"error: {type(exc).__name__}: {text[0] if text else ''}"


def _setting(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)
