"""The Python API's refusals, its failure safety in PyTorch DDP, and packaging."""
import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

from conftest import HERE, ROOT, ok, torchrun, train

BAD = os.path.join(HERE, "bad_input.py")
FAIL_HOOK = os.path.join(ROOT, "tests", "hooks", "fail_on_rank.py")


def refused(case, expect, tmp_path, nproc=1):
    run = torchrun(BAD, ["--case", case, "--ckpt", tmp_path / "ck"], nproc=nproc)
    assert run.returncode != 0, run.output[-3000:]
    assert "CAUGHT" in run.output, run.output[-3000:]
    line = next(line for line in run.output.splitlines() if "CAUGHT" in line)
    for word in expect:
        assert word in line, line
    return line


@pytest.mark.parametrize("case,expect", [
    ("unknown_hook", ["unknown hook 'no_such_hook'", "powersgd", ".py or .pt"]),
    ("twice", ["already has a comm hook"]),
    ("builtin_first", ["already has a comm hook"]),
    ("not_ddp", ["TypeError", "DistributedDataParallel", "Linear"]),
    ("ft_not_ddp", ["TypeError", "DistributedDataParallel"]),
    ("bad_param", ["rank", "powersgd"]),
    ("unknown_param", ["rnak"]),
    ("pinned", ["digest"]),
    ("commit_every", ["commit_every", "-1"]),
    ("twice_init", ["already exists", "once"]),
    ("step_before_resume", ["resume()"]),
    ("bad_agreement", ["unknown hook agreement 'sometimes'", "per-collective"]),
    ("per_step_on_gloo", ["per-step agreement needs", "NCCL", "per-collective"]),
])
def test_refusals(case, expect, tmp_path):
    refused(case, expect, tmp_path)


def test_another_world_size_resumes_and_another_job_or_damaged_store_is_refused(tmp_path):
    first = train(tmp_path, "a", steps=4, commit_every=2)
    ok(first)
    ckpt = tmp_path / "a-ckpt"
    args = ["--ckpt", ckpt, "--out", tmp_path / "b.json", "--steps", 6]
    trainer = os.path.join(HERE, "trainer.py")

    # One rank resumes a two-rank job's step 4 (a copy: the refusals below use the original).
    shutil.copytree(ckpt, tmp_path / "resized-ckpt")
    run = torchrun(trainer, ["--ckpt", tmp_path / "resized-ckpt", "--out", tmp_path / "r.json", "--steps", 6], nproc=1)
    assert run.returncode == 0, run.output[-3000:]
    assert "resumed from step 4" in run.output and "written at world size 2: resized to 1" in run.output, \
        run.output[-3000:]

    run = torchrun(trainer, args + ["--job-id", "another"], nproc=2)
    assert run.returncode != 0
    assert "another" in run.output and "trainer" in run.output, run.output[-3000:]

    run = torchrun(trainer, args + ["--lr", "0.01"], nproc=2)
    assert run.returncode != 0
    assert "'lr' was 0.001 in the checkpoint and is 0.01 now" in run.output, run.output[-3000:]
    # Typed: every rank raises ftcomm.ResumeRefused naming the setting.
    for rank in (0, 1):
        assert f"trainer: rank {rank} ResumeRefused step=4 settings=['lr']" in run.output, run.output[-3000:]

    os.remove(ckpt / "rank1" / "CURRENT")
    run = torchrun(trainer, args, nproc=2)
    assert run.returncode != 0
    assert "CURRENT" in run.output, run.output[-3000:]
    assert "trainer: rank 1 StoreError code=Corruption" in run.output, run.output[-3000:]


def test_failing_hook_fails_every_rank_naming_hook_and_rank(tmp_path):
    """A hook that raises, or returns the wrong shape, on rank 1 only: both ranks
    fail with the same error naming the hook and rank 1, well within the deadline
    (the group's timeout is 30 s); the failing rank also says what was wrong."""
    for mode, detail in (("0", "this rank's hook fails"), ("1", "returned Float[1] on cpu for a Float[")):
        run = train(tmp_path, f"f{mode}", hook=FAIL_HOOK, hook_arg=["fail_rank=1", f"mode={mode}"], steps=3,
                    timeout=30)
        assert run.returncode != 0
        for rank in (0, 1):
            # ftcomm.HookError (a RuntimeError) with the hook, rank and bucket as attributes.
            lines = [l for l in run.output.splitlines() if l.startswith(f"[rank{rank}]: ftcomm.errors.HookError")]
            assert lines, run.output[-4000:]
            assert "hook fail_on_rank failed on rank 1" in lines[-1] and "in bucket 0" in lines[-1], lines[-1]
            assert f"trainer: rank {rank} HookError hook=fail_on_rank rank=1 bucket=0 stuck=False" in run.output, \
                run.output[-4000:]
        assert detail in run.output, run.output[-4000:]
        assert run.seconds < 30, run.seconds


def test_failing_hook_with_fallback_trains_on(tmp_path):
    got = ok(train(tmp_path, "fb", hook=FAIL_HOOK, hook_arg=["fail_rank=1"], on_error="fallback", steps=3))
    assert got["fallbacks"] >= 3, got


def test_hook_check_and_version():
    import ftcomm
    report = ftcomm.hook_check("powersgd", world_size=2, rank=2)
    assert report["name"] == "powersgd" and report["buckets_checked"] > 0
    assert report["local_state"] == ["error"]
    with pytest.raises(RuntimeError, match="fail_on_rank"):
        ftcomm.hook_check(FAIL_HOOK)
    assert ftcomm.__version__ == importlib.metadata.version("ftcomm")
    cmake = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    assert f"project(ftcomm VERSION {ftcomm.__version__} " in cmake
    assert "allreduce" in ftcomm.list_hooks() and "powersgd" in ftcomm.list_hooks()
