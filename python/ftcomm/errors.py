"""The errors ftcomm raises that a script may want to tell apart.

Each subclasses ``RuntimeError`` (what these failures raised before), so a script
that catches ``RuntimeError`` keeps working::

    try:
        loss.backward()
    except ftcomm.HookError as e:          # every rank raises it, naming the same hook and rank
        log.error("hook %s failed on rank %s", e.hook, e.rank)
        raise

- ``HookError``: a scripted hook failed, or did not return in time, and the ranks
  agreed to stop (raised by ``loss.backward()`` or DDP's next forward).
- ``ResumeRefused``: ``FaultTolerant.resume()`` refused a checkpoint that does not fit
  this run (other settings, model, hook or trainer state); nothing was discarded.
- ``StoreError``: a rank's checkpoint store cannot be opened, read or written.
"""
import re

__all__ = ["FtcommError", "HookError", "ResumeRefused", "StoreError"]


class FtcommError(RuntimeError):
    """The base of ftcomm's errors; ``str(e)`` is the whole message."""


# The C++ layer's two messages that name one rank's failure (script_comm_hook.cpp):
#   hook NAME failed on rank R (REASON) in bucket B; every rank stops here ...
#   hook NAME did not return within S s on rank R in bucket B (stuck: ...
_FAILED = re.compile(r"hook (?P<hook>.+?) failed on rank (?P<rank>\d+)\b.* in bucket (?P<bucket>\d+); every rank",
                     re.S)
_STUCK = re.compile(r"hook (?P<hook>.+?) did not return within \S+ s on rank (?P<rank>\d+) in bucket (?P<bucket>\d+)")
_ANY = re.compile(r"hook (?P<hook>[^\s:]+)")


class HookError(FtcommError):
    """A scripted hook failed on some rank and every rank stopped.

    Attributes (None where the message names no single rank, as when a peer's
    process died or the ranks could not agree):
        hook:   the hook's name
        rank:   the rank whose hook failed or was stuck
        bucket: the bucket it failed in
        stuck:  True when it did not return within its deadline
    """

    def __init__(self, message="", hook=None, rank=None, bucket=None, stuck=None):
        super().__init__(message)
        text = str(message)
        match = _FAILED.search(text)
        stuck_match = _STUCK.search(text)
        if stuck_match and (not match or stuck_match.start() < match.start()):
            match, found_stuck = stuck_match, True
        else:
            found_stuck = False
        if match:
            hook = hook if hook is not None else match.group("hook")
            rank = rank if rank is not None else int(match.group("rank"))
            bucket = bucket if bucket is not None else int(match.group("bucket"))
            stuck = stuck if stuck is not None else found_stuck
        elif hook is None and (any_hook := _ANY.search(text)):
            hook = any_hook.group("hook")
        self.hook, self.rank, self.bucket, self.stuck = hook, rank, bucket, stuck


class ResumeRefused(FtcommError):
    """Resuming was refused before anything changed: the checkpoint does not fit.

    Attributes:
        step:     the step it would have resumed from
        settings: names of the settings that differ (empty when another model,
                  hook or trainer state was the reason)
    """

    def __init__(self, message="", step=None, settings=()):
        super().__init__(message)
        self.step, self.settings = step, list(settings)


class StoreError(FtcommError):
    """A checkpoint store cannot be opened, read or written.

    Attributes:
        code: NotFound, Corruption, IOError, InvalidArgument, Busy (another process
              holds it) or Incompatible (another job, rank or format)
    """

    def __init__(self, message="", code=None):
        super().__init__(message)
        self.code = code
