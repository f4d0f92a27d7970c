"""Issue 28: a checkpoint never runs code, a refusal never discards, and the Python
path keeps what it promises. Each case failed before its fix."""
import os
import pickle
import stat

import pytest
import torch

from conftest import HERE, ROOT, ok, torchrun, train

SCENARIO = os.path.join(HERE, "reliability.py")
MISUSE = os.path.join(HERE, "misuse.py")
TRAINER = os.path.join(HERE, "trainer.py")


def scenario(tmp_path, case, nproc=1, phase=0, ckpt="ckpt", **kw):
    args = ["--case", case, "--ckpt", tmp_path / ckpt, "--phase", phase]
    for k, v in kw.items():
        args += ["--" + k, v]
    return torchrun(SCENARIO, args, nproc=nproc)


def result_of(run):
    import json
    lines = [line for line in run.output.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.output[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


# --- data loss or a wrong result ---------------------------------------------------

def test_refused_resume_discards_nothing(tmp_path):
    """Rank 1 dies in step 7: rank 0 saves step 6 just in time. A relaunch with
    PowerSGD is refused; the correct relaunch still resumes from step 6."""
    run = train(tmp_path, "a", steps=12, commit_every=4, kill="1:7:backward")
    assert run.returncode != 0
    ckpt = tmp_path / "a-ckpt"
    args = ["--ckpt", ckpt, "--out", tmp_path / "b.json", "--steps", 12, "--commit-every", 4]
    bad = torchrun(TRAINER, args + ["--hook", "powersgd", "--hook-arg", "rank=2"], nproc=2)
    assert bad.returncode != 0
    assert "refusing to resume from step 4" in bad.output and "othing was discarded" in bad.output, bad.output[-3000:]
    assert "discarded commits" not in bad.output, bad.output[-3000:]
    none = torchrun(TRAINER, args + ["--hook", "none"], nproc=2)
    assert none.returncode != 0 and "this run has none" in none.output, none.output[-3000:]
    good = torchrun(TRAINER, args, nproc=2)
    assert good.returncode == 0, good.output[-3000:]
    assert "resumed from step 6 (a just-in-time commit)" in good.output, good.output[-3000:]


@pytest.mark.parametrize("world", [1, 3])
def test_batchnorm_statistics_carry_over_a_resize(tmp_path, world):
    first = result_of(scenario(tmp_path, "bn_resize", nproc=2, phase=0))
    resized = result_of(scenario(tmp_path, "bn_resize", nproc=world, phase=1))
    assert resized["report"]["resumed_world_size"] == 2 and resized["step"] == 4, resized
    assert resized["bn"] == first["bn_end"], (resized["bn"], first["bn_end"])
    assert resized["bn"]["num_batches_tracked"] == 4


def test_user_state_tensor_is_saved_as_it_was_at_its_step(tmp_path):
    run = scenario(tmp_path, "user_tensor_in_place", phase=0)
    assert run.returncode != 0 and "injected failure in step 6" in run.output, run.output[-3000:]
    got = result_of(scenario(tmp_path, "user_tensor_in_place", phase=1))
    assert got == {"step": 5, "counter": 5}, got


def test_finished_job_without_periodic_commits_can_be_continued(tmp_path):
    first = result_of(scenario(tmp_path, "continue_without_periodic", steps=3))
    assert first["start"] == 0 and first["step"] == 3
    more = result_of(scenario(tmp_path, "continue_without_periodic", steps=5))
    assert more["start"] == 3 and more["step"] == 5, more
    straight = result_of(scenario(tmp_path, "continue_without_periodic", steps=5, ckpt="straight"))
    assert more["digest"] == straight["digest"]


@pytest.mark.parametrize("when", ["after", "before"])
def test_sigterm_handler_of_the_script_is_chained(tmp_path, when):
    run = scenario(tmp_path, f"sigterm_handler_{when}")
    assert run.returncode != 0
    assert "the handler never ran" not in run.output, run.output[-3000:]
    assert open(tmp_path / "ckpt" / "handler-ran").read() == "15"
    assert "SIGTERM; saving step 3 just in time, then passing the signal" in run.output, run.output[-3000:]
    got = result_of(scenario(tmp_path, f"sigterm_handler_{when}", phase=1))
    assert got["step"] == 3 and got["report"]["resumed_just_in_time"], got


def test_every_optimizer_is_saved(tmp_path):
    first = result_of(scenario(tmp_path, "two_optimizers", steps=4))
    again = result_of(scenario(tmp_path, "two_optimizers", phase=1, steps=4))
    assert again["step"] == 4 and again["tensors"] == first["tensors"] > 0
    assert again["optimizer_digest"] == first["optimizer_digest"]


def test_another_optimizer_is_refused_by_name(tmp_path):
    result_of(scenario(tmp_path, "optimizer_swapped", phase=0, steps=2))
    run = scenario(tmp_path, "optimizer_swapped", phase=1, steps=4)
    assert run.returncode != 0
    assert "optimizer(s) SGD differ from this run's Adam" in run.output, run.output[-3000:]
    assert "KeyError" not in run.output, run.output[-3000:]


def test_user_state_that_differs_between_ranks_is_refused(tmp_path):
    run = scenario(tmp_path, "user_state_differs", nproc=2)
    assert run.returncode != 0
    assert "user_state differs between ranks (rank(s) [1]" in run.output, run.output[-3000:]


def test_a_paused_evaluation_is_no_stall(tmp_path):
    assert result_of(scenario(tmp_path, "paused_evaluation", steps=4))["step"] == 4
    run = scenario(tmp_path, "unpaused_evaluation", steps=4, ckpt="unpaused")
    assert run.returncode != 0 and "stalled for more than 1500 ms" in run.output, run.output[-3000:]


# --- code execution and file safety ------------------------------------------------

class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_forged_checkpoint_runs_no_code(tmp_path):
    from ftcomm import _state
    marker = tmp_path / "ran"
    data = pickle.dumps({"format": 1, "parts": {"user": _Evil(marker)}, "tensors": 0}, protocol=4)
    forged = [torch.frombuffer(bytearray(data), dtype=torch.uint8)]
    with pytest.raises(_state.UnsafeStateError, match="never writes"):
        _state.unpack(forged)
    assert not marker.exists()
    # What ftcomm writes reads back, OrderedDicts, sets, dtypes and tensors included.
    import collections
    parts = {"user": {"a": collections.OrderedDict(x=1), "b": {1, 2}, "d": torch.float16, "t": torch.ones(2),
                      "nested": [(1.5, None, b"x", "s")]}}
    back = _state.unpack(_state.pack(parts))
    assert back["user"]["a"] == parts["user"]["a"] and back["user"]["b"] == {1, 2}
    assert back["user"]["d"] is torch.float16 and torch.equal(back["user"]["t"], torch.ones(2))
    assert back["user"]["nested"] == [(1.5, None, b"x", "s")]


def test_a_store_others_can_write_is_refused(tmp_path):
    ok(train(tmp_path, "a", steps=2, commit_every=2))
    rank0 = tmp_path / "a-ckpt" / "rank0"
    os.chmod(rank0, 0o777)
    run = train(tmp_path, "a", steps=4, commit_every=2)
    assert run.returncode != 0
    assert "may be written by other users (mode 0777)" in run.output and "chmod go-w" in run.output, \
        run.output[-3000:]
    os.chmod(rank0, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    assert ok(train(tmp_path, "a", steps=4, commit_every=2))["report"]["resumed_from_step"] == 2


# --- crashes -----------------------------------------------------------------------

def test_find_unused_parameters_works_with_a_hook(tmp_path):
    got = result_of(scenario(tmp_path, "find_unused", nproc=2, steps=4))
    assert got["step"] == 4


def test_a_failed_just_in_time_save_is_one_line(tmp_path):
    run = scenario(tmp_path, "jit_save_disk_full")
    assert run.returncode != 0
    assert "ftcomm: the just-in-time save failed:" in run.output and "ulimit -f" in run.output, run.output[-3000:]
    assert "Exception raised from" not in run.output and "frame #" not in run.output, run.output[-3000:]


# --- argument misuse, refused with the argument, the value and the fix --------------

@pytest.fixture(scope="module")
def misuse(tmp_path_factory):
    run = torchrun(MISUSE, [tmp_path_factory.mktemp("misuse")], nproc=1)
    lines = {}
    for line in run.output.splitlines():
        if line.startswith("CASE "):
            name, _, text = line[len("CASE "):].partition(": ")
            lines[name] = text
    assert lines, run.output[-4000:]
    return lines


@pytest.mark.parametrize("case,expect", [
    ("user_state_list", ["TypeError", "user_state must be a dict"]),
    ("step_negative", ["steps must increase"]),
    ("step_float", ["TypeError", "must be an int", "2.0"]),
    ("step_str", ["TypeError", "must be an int", "'2'"]),
    ("step_huge", ["below 2**62"]),
    ("step_twice", ["step_done(1)", "previous step_done was step 1"]),
    ("step_back", ["step_done(1)", "previous step_done was step 2"]),
    ("job_id_newline", ["job_id", "line breaks", "'a\\nb'"]),
    ("job_id_empty", ["job_id", "non-empty"]),
    ("update_grace_inf", ["update_grace", "finite", "inf"]),
    ("stall_timeout_nan", ["stall_timeout", "finite", "nan"]),
    ("allow_changed_str", ["TypeError", "allow_changed_settings=['lr']"]),
    ("pins_str", ["TypeError", "pins=['000"]),
    ("powersgd_rank_fraction", ["rank=2.5", "whole number"]),
    ("hook_timeout_inf", ["hook_timeout", "finite"]),
    ("second_optimizer_missing", ["1.weight", "1.bias", "Pass every optimizer"]),
    ("user_state_unsafe_class", ["UnsafeStateError", "user state", "Unsafe", "plain values"]),
    ("init_timeout_inf", ["timeout", "finite", "inf"]),
])
def test_misuse_is_refused(misuse, case, expect):
    line = misuse.get(case, "(case did not run)")
    assert line.startswith("CAUGHT"), (case, line)
    for word in expect:
        assert word in line, (case, word, line)
