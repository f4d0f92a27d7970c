"""Bit-exact recovery for PyTorch's DistributedDataParallel."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import _C, _state
from .errors import ResumeRefused
from .hooks import Hook


class _Refused(ResumeRefused, ValueError):
    """A refused resume decided in Python (the optimizers do not fit): a ResumeRefused
    that is also the ValueError these raised before."""

    def __init__(self, step, message):
        super().__init__(message, step=step)


class FaultTolerant:
    """Commits a DDP job's state to one RocksDB store per rank and resumes it bit-exactly.

    What is saved at each commit, and restored by :meth:`resume`:

    * the model's parameters (replicated) and buffers (BatchNorm statistics
      included). Buffers are kept twice: as each rank's own (each rank updates them
      with its own batch; restored byte for byte, from the buddy copy for a replaced
      rank) and as replicated state, which is what a rank gets when its own is gone:
      at a resize, or under ``jit_policy="reset"``. With ``broadcast_buffers=True``
      (DDP's default) every rank uses rank 0's buffers at the next forward anyway;
      with ``broadcast_buffers=False`` a resized job's ranks all start from the
      buffers of the rank that served the resumed step (rank-local statistics do not
      map one to one onto another world size), and the resume line says so;
    * every optimizer's full ``state_dict`` (its tensors, and the numbers and lists of
      ``param_groups``), and its class: a resume with another optimizer is refused;
    * the hook's replicated and rank-local state (e.g. PowerSGD's error feedback);
    * torch's CPU RNG state and, when the model is on a GPU, that GPU's RNG state
      (rank-local: rank r + the ranks per node keeps a byte-exact copy of rank r's
      rank-local state, on the next node);
    * ``user_state``, the trainer's own small dict (a data position, a scheduler's
      ``state_dict()``, an epoch): tensors and plain values (numbers, strings, bytes,
      None, lists, tuples, dicts, sets), the same on every rank (checked at the first
      ``step_done``). Its tensors are copied at each ``step_done``, so an in-place
      change during the next step never leaks into the saved one. Other classes are
      refused when saved: reading a checkpoint never runs code;
    * the Reducer's bucket layout, which a resume reuses.

    Just in time (``jit=True``, the default): at a failure each surviving rank
    saves the state of its last finished step to its store, without any
    collective, and exits; the restarted job resumes there, so a failure costs at
    most the step in progress even with ``commit_every=0``. A survivor finds out
    by a collective error (a dead Gloo peer; the exception that leaves the
    script is caught by ``sys.excepthook``, or by ``with ft:``), by a step that
    stalls past ``stall_timeout`` (a hung peer or NCCL collective), or by
    torchrun's SIGTERM (caught in C++; it then saves and exits with 143, within
    torchrun's 30 s before SIGKILL). A SIGTERM handler of the script's own,
    installed before :meth:`resume` or after it, is chained: the save comes first,
    then the signal goes to that handler, which decides what happens next. The last finished step is the one of the
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

    A stall is measured from one ``step_done`` to the next: wrap healthy work
    between steps that can take longer than ``stall_timeout`` (an evaluation pass)
    in ``with ft.paused():``.

    Args:
        model: the DDP model (a hook, if any, registered with :func:`ftcomm.register_hook`).
        optimizer: its optimizer, or a list of optimizers; together they must hold
            every parameter the model trains (each one's state is saved).
        ckpt_dir: the stores' directory (on each node its own disk); rank r uses
            ``<ckpt_dir>/rank<r>``, or takes over a store there of a rank the node no
            longer runs (the rendezvous numbered the node's workers anew).
        commit_every: a snapshot every K steps. 0: no periodic snapshots; the job's
            last step is still committed by :meth:`close`, so a finished job can be
            continued with more steps.
        hook: the :class:`ftcomm.Hook` of ``model``, whose state is saved (default:
            the one registered on ``model``).
        keep_snapshots: how many snapshots each store keeps.
        staging_slots: host copies of a snapshot kept for the disk writer (1 to 8),
            each the size of this rank's state, pinned for GPU state. A commit
            copies into a free slot and returns (GPU state: the copy runs on a side
            stream that the next optimizer step waits for on the GPU, not the host);
            the write and fsync run in the background. 2 lets a commit overlap the
            previous one's write. Memory: ``staging_slots`` x the state's bytes.
        when_behind: what a commit does when every slot is still being written
            (commits outpace the disk): ``"wait"`` for one, or ``"skip"`` this rank's
            commit (a resume then resyncs this rank from a peer). Both are logged and
            counted in :attr:`snapshot_stats`.
        write_mb_per_s: caps the background writer (MB/s; 0: no cap), for a disk
            that training's own reads share.
        direct_writes: CPU state's snapshots are written with direct I/O where the
            file system takes it: no copy into the page cache, which costs training's
            cores CPU at every commit (on a 2-core machine, ~40 ms for 151 MB). A
            restart on the same host then reads the snapshot from the disk rather
            than the cache. ``False``: through the page cache. GPU state's snapshots
            always go through the page cache.
        job_id: the job's name (printable, no line breaks, not empty); a store
            written under another is refused.
        settings: name -> value of what changes the result (learning rate, batch, ...);
            a resume with other values is refused unless the name (or ``"all"``) is
            in ``allow_changed_settings`` (a list of names). Hook parameters are recorded
            as ``hook.<name>``.
        user_state: the trainer's own dict; :meth:`resume` updates it in place.
        jit: just-in-time commits at a failure (above).
        jit_policy: ``"exact"`` or ``"reset"`` (above).
        stall_timeout: seconds a step may run before it counts as stalled (save,
            then exit 1); default 0.9 x the process group's timeout (never when the
            group does not report one); 0: never.
        update_grace: seconds a SIGTERM waits for an optimizer step in progress.
    """

    def __init__(self, model: DistributedDataParallel, optimizer: torch.optim.Optimizer, ckpt_dir: str, *,
                 commit_every: int = 10, hook: Optional[Hook] = None, keep_snapshots: int = 2,
                 staging_slots: int = 2, when_behind: str = "wait", write_mb_per_s: float = 0,
                 direct_writes: bool = True,
                 job_id: str = "ftcomm", settings: Optional[dict] = None,
                 allow_changed_settings: Iterable[str] = (), user_state: Optional[dict] = None,
                 jit: bool = True, jit_policy: str = "exact", stall_timeout: Optional[float] = None,
                 update_grace: float = 10.0):
        if not isinstance(model, DistributedDataParallel):
            raise TypeError(f"FaultTolerant needs a torch.nn.parallel.DistributedDataParallel model, got "
                            f"{type(model).__name__}")
        optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        for o in optimizers:
            if not isinstance(o, torch.optim.Optimizer):
                raise TypeError(f"FaultTolerant needs a torch.optim.Optimizer (or a list of them), got "
                                f"{type(o).__name__}")
        if not optimizers:
            raise ValueError("FaultTolerant needs at least one optimizer")
        if isinstance(commit_every, bool) or not isinstance(commit_every, int) or commit_every < 0:
            raise ValueError(f"commit_every must be a whole number of steps, 0 or more; got {commit_every!r}")
        if isinstance(keep_snapshots, bool) or not isinstance(keep_snapshots, int) or keep_snapshots < 1:
            raise ValueError(f"keep_snapshots must be a whole number, 1 or more; got {keep_snapshots!r}")
        if isinstance(staging_slots, bool) or not isinstance(staging_slots, int) or not 1 <= staging_slots <= 8:
            raise ValueError(f"staging_slots must be a whole number from 1 to 8, got {staging_slots!r} (each slot "
                             "holds one host copy of the state; 2 overlaps a commit with the previous write)")
        if when_behind not in ("wait", "skip"):
            raise ValueError(f"when_behind must be 'wait' or 'skip', got {when_behind!r}")
        write_mb_per_s = _seconds("write_mb_per_s", write_mb_per_s, "0 (no cap) or positive MB/s")
        if jit_policy not in ("exact", "reset"):
            raise ValueError(f"jit_policy must be 'exact' or 'reset', got {jit_policy!r}")
        if stall_timeout is not None:  # None: the job's deadline, 0.9 x the group's timeout
            stall_timeout = _seconds("stall_timeout", stall_timeout, "0 (never) or positive seconds")
        update_grace = _seconds("update_grace", update_grace, "0 or more seconds")
        if not ckpt_dir:
            raise ValueError("ckpt_dir is empty; give the directory the ranks' stores live in")
        if not isinstance(job_id, str) or not job_id or not job_id.isprintable() or len(job_id) > 200:
            raise ValueError(f"job_id must be a non-empty printable string without line breaks (at most 200 "
                             f"characters), got {job_id!r}; it names the job whose stores may be resumed")
        if user_state is not None and not isinstance(user_state, dict):
            raise TypeError(f"user_state must be a dict (resume() updates it in place), got "
                            f"{type(user_state).__name__}; wrap it: user_state={{'values': ...}}")
        if isinstance(allow_changed_settings, (str, bytes)):
            raise TypeError(f"allow_changed_settings must be a list of setting names, got the string "
                            f"{allow_changed_settings!r}; write allow_changed_settings=[{allow_changed_settings!r}]")
        if settings is not None and not isinstance(settings, dict):
            raise TypeError(f"settings must be a dict of name -> value, got {type(settings).__name__}")
        self.model = model
        self.optimizer = optimizers[0]
        self.optimizers = optimizers
        self._check_every_parameter_has_an_optimizer()
        self.hook = hook if hook is not None else getattr(model, "_ftcomm_hook", None)
        self.user_state = user_state if user_state is not None else {}
        self.report: dict = {}
        pg = model.process_group
        self._pg = pg
        self.rank = pg.rank()
        self.world_size = pg.size()
        self._params = model._build_params_for_reducer()[0]
        self._device = next((p.device for p in self._params if p.device.type == "cuda"), None)
        self._resumed = False
        self._last_step: Optional[int] = None
        self._user_checked = False
        # The rank's Job (C++, shared with ftcomm train): collective, it finds this
        # rank's store under ckpt_dir, or takes over a leftover store on this disk
        # after a rendezvous numbered the ranks anew.
        self._ckpt = _C.Job(pg, os.fspath(ckpt_dir), job_id, commit_every, keep_snapshots, staging_slots, when_behind,
                            write_mb_per_s, bool(direct_writes),
                            {str(k): _setting(v) for k, v in (settings or {}).items()},
                            set(map(str, allow_changed_settings)), bool(jit), jit_policy, stall_timeout,
                            float(update_grace))
        self.ckpt_dir = self._ckpt.store_dir
        self._update_handles: list = []
        self._previous_excepthook = None

    def _check_every_parameter_has_an_optimizer(self) -> None:
        held = {id(p) for o in self.optimizers for g in o.param_groups for p in g["params"]}
        names = {id(p): n for n, p in self.model.module.named_parameters()}
        missing = [names.get(id(p), "?") for p in self.model.module.parameters() if p.requires_grad and id(p) not in held]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"the model's parameter(s) {shown} belong to none of the optimizers given to "
                             "FaultTolerant, so their optimizer state would not be saved. Pass every optimizer: "
                             "FaultTolerant(model, [optimizer_a, optimizer_b], ...)")

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

    def _objects(self) -> dict:
        parts = {"optimizer": self.optimizers[0].state_dict(), "user": self.user_state,
                 "optimizer_classes": [type(o).__qualname__ for o in self.optimizers]}
        if len(self.optimizers) > 1:
            parts["more_optimizers"] = [o.state_dict() for o in self.optimizers[1:]]
        return parts

    def _c_state(self) -> _C.State:
        state = _C.State()
        state.parameters = self._params
        # Replicated too: a rank whose own buffers are gone (a resize, policy
        # reset) gets the resumed step's instead of the initial values.
        state.buffers = self._buffers()
        state.objects = _state.pack(self._objects(), copy=("user",))
        state.rank_local = self._rank_local()
        state.hook = self.hook._impl if self.hook is not None else None
        return state

    def _restore_objects(self, parts: dict, step: int) -> None:
        classes = parts.get("optimizer_classes")
        mine = [type(o).__qualname__ for o in self.optimizers]
        saved = [parts["optimizer"]] + list(parts.get("more_optimizers", []))
        if classes is not None and list(classes) != mine:
            raise _Refused(step, f"the checkpoint's optimizer(s) {', '.join(classes)} differ from this run's "
                             f"{', '.join(mine)}; resume with the same optimizer(s), or give FaultTolerant a new "
                             "ckpt_dir (nothing was discarded)")
        if len(saved) != len(self.optimizers):
            raise _Refused(step, f"the checkpoint holds the state of {len(saved)} optimizer(s), this run has "
                             f"{len(self.optimizers)}; pass the same optimizers in the same order, or give "
                             "FaultTolerant a new ckpt_dir (nothing was discarded)")
        for i, (o, sd) in enumerate(zip(self.optimizers, saved)):
            try:
                o.load_state_dict(sd)
            except (KeyError, ValueError, TypeError, IndexError) as e:
                raise _Refused(step, f"the checkpoint's state of optimizer {i} does not fit this run's "
                                 f"{type(o).__qualname__} ({type(e).__name__}: {e}); resume with the optimizer "
                                 "that wrote it, or give FaultTolerant a new ckpt_dir (nothing was discarded)") from None
        self.user_state.clear()
        self.user_state.update(parts["user"])

    # --- the protocol ------------------------------------------------------------
    def resume(self) -> int:
        """Collective, once, before the first step: restores the newest step the job can
        resume from and returns it (0 on a fresh job). ``self.report`` says what
        happened (resumed step, resynced ranks, bytes, times, rank-local state)."""
        if self._resumed:
            raise RuntimeError("FaultTolerant.resume() runs once, before the first step")
        self._resumed = True
        with torch.no_grad():
            report, line, objects, rank_local = self._ckpt.resume(self._c_state(), self.model.reducer)
        self.report = json.loads(report)
        step = self.report["resumed_from_step"]
        if step >= 0:
            self._restore_objects(_state.unpack(list(objects)), step)
            torch.set_rng_state(rank_local[0].cpu())
            if self._device is not None:
                torch.cuda.set_rng_state(rank_local[1].cpu(), self._device)
            rng_count = 1 if self._device is None else 2  # as _rng() lays them out
            # This rank's own buffers where they were restored; where its
            # rank-local state started afresh these are the live tensors, which
            # already hold the replicated buffers of the resumed step.
            for mine, saved in zip(self._buffers(), rank_local[rng_count:]):
                mine.copy_(saved)
        # Every rank has accepted the plan: now what it left behind may go.
        self._ckpt.accept()
        self._last_step = max(step, 0)
        if self._ckpt.jit_active:
            self._arm_just_in_time()
        if self.rank == 0:
            if step < 0:
                line = f"fresh start ({self.world_size} ranks, stores under {os.path.dirname(self.ckpt_dir)})"
            elif self.report["resumed_world_size"] != self.world_size and self._buffers():
                line += ("; buffers (BatchNorm statistics) carried over from the rank that served the step"
                         + ("" if self.model.broadcast_buffers else
                            ", the same on every rank (broadcast_buffers=False: per-rank statistics do not "
                            "map onto another world size)"))
            print(f"ftcomm: {line}", file=sys.stderr, flush=True)
        return max(step, 0)

    def step_done(self, step: int) -> bool:
        """Collective when due: call after ``optimizer.step()`` of step ``step`` (1, 2, ...).
        Every ``commit_every`` steps it snapshots the state (copied to host now,
        written in the background; the previous snapshot is waited for first).
        Returns whether it committed."""
        if not self._resumed:
            raise RuntimeError("call FaultTolerant.resume() before the first step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step_done(step): step must be an int, the number of the step just finished "
                            f"(1, 2, ...), got {step!r} ({type(step).__name__})")
        if step <= self._last_step or step >= 1 << 62:
            hint = (f"the previous step_done was step {self._last_step}" if step <= self._last_step
                    else "step numbers stay below 2**62")
            raise ValueError(f"step_done({step}): steps must increase, one call per finished step ({hint}; "
                             f"resume() returned the step to continue after)")
        if not self._user_checked:
            self._check_user_state_agrees()
        self._last_step = step
        if not self._ckpt.jit_active and not self._ckpt.due(step):
            return False
        with torch.no_grad():
            return self._ckpt.step_done(step, self._c_state(), self.model.reducer, step)

    def _check_user_state_agrees(self) -> None:
        # Collective, once: user_state is replicated (a resync copies rank 0's
        # over every other), so ranks that disagree would lose theirs silently.
        digest = _C.tensors_digest(_state.pack({"user": _canonical(self.user_state)}))
        mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine, group=self._pg)
        differ = [r for r, d in enumerate(every) if not torch.equal(d, every[0])]
        self._user_checked = True
        if differ:
            raise ValueError(f"user_state differs between ranks (rank(s) {differ} differ from rank 0); it is "
                             "replicated state, and a resync would overwrite a rank's with rank 0's. Keep per-rank "
                             "values (a data cursor of each rank's own shard) out of it, or make them equal")

    @contextlib.contextmanager
    def paused(self):
        """No step counts as stalled inside this block: for healthy work between steps
        that can outlast ``stall_timeout`` (an evaluation pass, a long data reload).
        Not a collective; a SIGTERM inside it still saves the last finished step."""
        self._ckpt.pause_watch(True)
        try:
            yield self
        finally:
            self._ckpt.pause_watch(False)

    def save_just_in_time(self, reason: str = "requested") -> bool:
        """Saves the last finished step now, without any collective (what a failure
        does). Returns whether a commit was written: not when the store already
        holds that step, when jit is off, or mid-update."""
        return self._ckpt.save_just_in_time(str(reason))

    # --- just in time ------------------------------------------------------------
    def _arm_just_in_time(self) -> None:
        self._update_handles = [o.register_step_pre_hook(_BeginUpdate(self)) for o in self.optimizers]
        self._previous_excepthook = sys.excepthook
        sys.excepthook = _SaveOnError(self._ckpt, self._previous_excepthook)

    def _disarm_just_in_time(self) -> None:
        for handle in self._update_handles:
            handle.remove()
        self._update_handles = []
        if self._previous_excepthook is not None:
            if isinstance(sys.excepthook, _SaveOnError):
                sys.excepthook = self._previous_excepthook
            self._previous_excepthook = None

    def commits(self) -> list:
        """This rank's commits, oldest first, as ``ftcomm inspect --json`` names their fields
        (step, world_size, rank, layout_signature, snapshot, kind, snapshot_bytes, settings, ...)."""
        return [json.loads(c) for c in self._ckpt.commits()]

    def flush(self) -> None:
        """Waits for the snapshots in flight; raises the first error among them."""
        self._ckpt.flush()

    @property
    def snapshot_stats(self) -> dict:
        """What this rank's periodic snapshots cost so far: ``taken``; ``waited`` (commits
        that waited for a free staging slot because the disk was behind) and
        ``waited_ms``; ``skipped`` (``when_behind="skip"``); ``written`` and
        ``write_ms`` (the background writer's time); ``staging_bytes`` and
        ``pinned_bytes`` (host memory the staging slots hold)."""
        return json.loads(self._ckpt.snapshot_stats())

    def close(self) -> None:
        """Collective, at the end of training: with ``commit_every=0`` commits the last
        step (so the job can be continued with more steps), waits for the snapshot in
        flight and stops just-in-time saving (a SIGTERM after it is no longer caught;
        a SIGTERM handler of the script's own is put back)."""
        self._close(finished=True)

    def _close(self, finished: bool) -> None:
        if finished and self._resumed and self._last_step:
            with torch.no_grad():
                self._ckpt.commit_last(self._last_step, self._c_state(), self.model.reducer, self._last_step)
        self._disarm_just_in_time()
        self._ckpt.stop_just_in_time()
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        failed = exc is not None
        if failed and self._ckpt.jit_active and not isinstance(exc, (KeyboardInterrupt, GeneratorExit)):
            try:
                self._ckpt.save_just_in_time(_reason(exc))
            except Exception as save_error:  # noqa: BLE001 - the original error matters more
                print(f"ftcomm: the just-in-time save failed: {_first_line(save_error)}", file=sys.stderr, flush=True)
        # After an error no collective: the peers may be gone.
        self._close(finished=not failed)
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
                print(f"ftcomm: the just-in-time save failed: {_first_line(save_error)}", file=sys.stderr, flush=True)
        self._previous(exc_type, exc, tb)


def _canonical(obj: Any) -> Any:
    # Equal sets pickle in hash order, which differs between processes (string
    # hashing is salted per process): compare them sorted.
    if isinstance(obj, (set, frozenset)):
        return ("<set>", sorted((_canonical(v) for v in obj), key=repr))
    if isinstance(obj, dict):
        return {k: _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_canonical(v) for v in obj)
    return obj


def _first_line(exc: BaseException) -> str:
    # A torch error's text can carry a C++ stack trace after its first line.
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"error: {type(exc).__name__}: {text[0] if text else ''}"


def _seconds(name: str, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or value >= 1e9:
        raise ValueError(f"{name} must be {what} (finite, below 1e9), got {value!r}")
    return float(value)


def _setting(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)
