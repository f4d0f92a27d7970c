"""ftcomm's typed errors: what a script can catch and read (no torchrun; the
torchrun cases in test_api.py see them raised by backward() and resume())."""
import pickle

import pytest

import ftcomm
from ftcomm import errors

pytestmark = pytest.mark.fast


def test_every_error_is_a_runtime_error():
    for cls in (ftcomm.FtcommError, ftcomm.HookError, ftcomm.ResumeRefused, ftcomm.StoreError):
        assert issubclass(cls, RuntimeError)
        assert issubclass(cls, ftcomm.FtcommError)


def test_a_hook_error_reads_the_hook_rank_and_bucket_from_the_agreed_message():
    # As torch's bindings raise it from backward(): the message alone.
    failed = ftcomm.HookError(
        "hook fail_on_rank failed on rank 1 (threw: went wrong in bucket 7) in bucket 0; every rank stops here "
        "(the ranks agreed: recorded by rank 1). Fix the hook")
    assert (failed.hook, failed.rank, failed.bucket, failed.stuck) == ("fail_on_rank", 1, 0, False)
    stuck = ftcomm.HookError(
        "hook slow did not return within 1.5 s on rank 3 in bucket 2 (stuck: an endless loop, or far too slow for "
        "the job's --timeout); every rank stops here. Fix the hook, or raise --timeout (the ranks agreed)")
    assert (stuck.hook, stuck.rank, stuck.bucket, stuck.stuck) == ("slow", 3, 2, True)
    # A failure that is no one rank's: the hook is named, the rank is not.
    general = ftcomm.HookError("hook allreduce in bucket 4 on rank 0: a collective failed (x) with no hook failure "
                               "on record: a peer's process died")
    assert general.hook == "allreduce" and general.rank is None and general.bucket is None
    assert str(failed).startswith("hook fail_on_rank failed on rank 1")


def test_attributes_given_explicitly_win_and_survive_pickling():
    e = ftcomm.HookError("hook h failed on rank 2 in bucket 1; every rank stops here", hook="h", rank=2, bucket=1,
                         stuck=False)
    back = pickle.loads(pickle.dumps(e))
    assert isinstance(back, ftcomm.HookError) and (back.hook, back.rank, back.bucket) == ("h", 2, 1)
    r = ftcomm.ResumeRefused("refusing to resume from step 4 with other settings", step=4, settings=["lr"])
    assert (r.step, r.settings) == (4, ["lr"])
    s = ftcomm.StoreError("Busy: checkpoint store /x is in use", code="Busy")
    assert s.code == "Busy"


def test_the_optimizer_refusal_is_a_resume_refused_and_still_a_value_error():
    from ftcomm.fault_tolerant import _Refused
    e = _Refused(10, "the checkpoint's optimizer(s) SGD differ from this run's Adam")
    assert isinstance(e, ftcomm.ResumeRefused) and isinstance(e, ValueError) and e.step == 10
    assert errors.__all__ == ["FtcommError", "HookError", "ResumeRefused", "StoreError"]
