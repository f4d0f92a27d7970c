"""Python DDP with ftcomm under torchrun with real SIGKILLs: every run ends
bit-identical (parameters, BatchNorm buffers, Adam state) to an uninterrupted one."""
import pytest

from conftest import ok, train

# Every library hook that reduces gradients (noop does not: its ranks diverge).
HOOKS = {
    "allreduce": [],
    "fp16_compress": [],
    "bf16_compress": [],
    "int8_quantize": [],
    "powersgd": ["rank=2", "start_iter=2"],
    "topk": ["ratio=0.05"],
}

_baselines = {}


def baseline(tmp_path_factory, hook, nproc, steps=12):
    key = (hook, nproc, steps)
    if key not in _baselines:
        tmp = tmp_path_factory.mktemp(f"base-{hook}-{nproc}")
        _baselines[key] = ok(train(tmp, "base", nproc=nproc, hook=hook, hook_arg=HOOKS.get(hook, []), steps=steps))
    return _baselines[key]


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_kill_mid_backward_resumes_bit_exact(tmp_path, tmp_path_factory, hook):
    """A rank SIGKILLed inside a step (after its forward); torchrun restarts the job,
    which resumes at the last commit and finishes digest-equal."""
    run = train(tmp_path, "run", hook=hook, hook_arg=HOOKS[hook], kill="1:7:backward", max_restarts=1)
    got = ok(run)
    assert "killed at step 7" in run.output
    assert got["attempt"] == 1 and got["report"]["resumed_from_step"] == 6, got
    assert got["digest"] == baseline(tmp_path_factory, hook, 2)["digest"]
    assert got["user"] == {"epoch": 2, "seen": 12 * 16}


def test_replaced_rank_world3_powersgd_gets_state_from_peers(tmp_path, tmp_path_factory):
    """World 3: rank 1 dies after a commit and comes back with an empty disk. It is
    resynced with broadcast_coalesced and its PowerSGD error feedback, RNG and
    BatchNorm buffers come from rank 2's buddy copy."""
    run = train(tmp_path, "run", nproc=3, hook="powersgd", hook_arg=HOOKS["powersgd"], kill="1:8:commit",
                wipe=1, max_restarts=1)
    got = ok(run)
    report = got["report"]
    assert report["resumed_from_step"] == 8 and report["resynced_ranks"] == [1], report
    assert report["resync_bytes"] > 0
    assert "rank 1: restored from rank 2's buddy copy" in report["local_state"], report
    assert got["digest"] == baseline(tmp_path_factory, "powersgd", 3)["digest"]


def test_world4_failure_during_recovery(tmp_path, tmp_path_factory):
    """World 4: rank 2 dies mid-step; in the restarted attempt rank 3 dies while its
    peers are inside resume(). The third attempt resumes and ends digest-equal."""
    run = train(tmp_path, "run", nproc=4, hook="fp16_compress", kill="2:5:forward", kill_before_resume=3,
                max_restarts=2)
    got = ok(run)
    assert got["attempt"] == 2 and got["report"]["resumed_from_step"] == 4, got
    assert got["digest"] == baseline(tmp_path_factory, "fp16_compress", 4)["digest"]


def test_kill_rank0_between_commits_no_hook(tmp_path, tmp_path_factory):
    """Rank 0 (the one DDP broadcasts buffers from) dies after an optimizer step
    that was not committed; plain DDP without an ftcomm hook."""
    run = train(tmp_path, "run", hook="none", kill="0:5:commit", max_restarts=1)
    got = ok(run)
    assert got["report"]["resumed_from_step"] == 4
    assert got["digest"] == baseline(tmp_path_factory, "none", 2)["digest"]
