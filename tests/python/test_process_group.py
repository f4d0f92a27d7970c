"""ftcomm.init_process_group under torchrun restarts, and the example script."""
import os
import re

from conftest import HERE, ROOT, torchrun

PROBE = os.path.join(HERE, "restart_probe.py")
EXAMPLE = os.path.join(ROOT, "examples", "train_ddp.py")


def test_restarted_group_forms_again():
    """Rank 1 is SIGKILLed in the first attempt; the restarted attempt's group forms
    on fresh keys and completes. (The plain dist.init_process_group("gloo") baseline
    is measured by tests/bench/restart_bench.py: it does not come back reliably.)"""
    run = torchrun(PROBE, ["--init", "ftcomm"], nproc=2, max_restarts=2, deadline=120)
    assert run.returncode == 0, run.output[-4000:]
    assert "probe: attempt 1 ok" in run.output
    assert "[attempt 1]" in run.output


def test_example_resumes_after_a_kill_bit_exact(tmp_path):
    """examples/train_ddp.py killed at step 25 (rank 1) resumes from step 20 and ends
    with the parameters of an uninterrupted run."""
    def digest(run):
        assert run.returncode == 0, run.output[-4000:]
        return re.search(r"parameter digest ([0-9a-f]{64})", run.output).group(1)

    common = ["--steps", 40, "--commit-every", 10]
    clean = torchrun(EXAMPLE, common + ["--ckpt", tmp_path / "a"], nproc=2)
    failed = torchrun(EXAMPLE, common + ["--ckpt", tmp_path / "b", "--fail-at", 25], nproc=2, max_restarts=1)
    assert "killing itself at step 25" in failed.output
    assert "ftcomm: resumed from step 20" in failed.output, failed.output[-4000:]
    assert digest(failed) == digest(clean)
