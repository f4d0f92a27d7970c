"""End-to-end: `ftcomm train` under torchrun with real failures resumes bit-exactly.

For world sizes 2 to 4 and every shipped hook, a run with a SIGKILL (at several
steps and phases, restarted by torchrun) must end with the same parameter digest as
an uninterrupted run. Further cases: an external kill -9 from this test, a replaced
node (one rank's store deleted), a second failure during recovery, three failures in
one run, a full restart from the stores alone, and a hook file written here and
deployed by path. Every run has a deadline and is killed at it.

    python3 tests/e2e/train_recovery_test.py --ftcomm build/ftcomm [-k SUBSTRING]
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HOOKS = ["allreduce", "fp16_compress", "bf16_compress", "powersgd", "int8_quantize", "topk", "noop"]
PHASES = ["backward", "hook", "forward", "commit"]
STEPS = 40
DEADLINE = 240  # seconds per torchrun


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hook_args(hook):
    return ["--hook-arg", "start_iter=5", "--hook-arg", "rank=2"] if hook == "powersgd" else []


class Runner:
    def __init__(self, ftcomm, workdir):
        self.ftcomm, self.workdir, self.count = ftcomm, workdir, 0
        self.references = {}

    def command(self, world, restarts, args):
        return [sys.executable, "-m", "torch.distributed.run", "--no-python", f"--nproc-per-node={world}",
                f"--max-restarts={restarts}", "--monitor-interval=0.2", f"--master-port={free_port()}",
                self.ftcomm, "train", "--log-every", "10"] + args

    def train(self, world, hook, extra, steps=STEPS, ckpt=None, restarts=3, external_kill_at=None):
        self.count += 1
        ckpt = ckpt or os.path.join(self.workdir, f"run{self.count}")
        summary = os.path.join(self.workdir, f"run{self.count}.json")
        args = ["--steps", str(steps), "--hook", hook, "--ckpt", ckpt, "--commit-every", "10",
                "--summary-json", summary] + hook_args(hook) + extra
        env = dict(os.environ, TORCH_FR_BUFFER_SIZE="0", PYTHONWARNINGS="ignore")
        proc = subprocess.Popen(self.command(world, restarts, args), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        output, killed = [], False
        deadline = time.time() + DEADLINE
        try:
            for line in proc.stdout:
                output.append(line)
                if external_kill_at and not killed and line.startswith(f"step {external_kill_at}/"):
                    workers = subprocess.run(["pgrep", "-f", f"{self.ftcomm} train .*{summary}"],
                                             capture_output=True, text=True).stdout.split()
                    workers = [int(p) for p in workers if int(p) != proc.pid]
                    if workers:
                        os.kill(workers[-1], signal.SIGKILL)
                        killed = True
                if time.time() > deadline:
                    raise TimeoutError
            proc.wait(timeout=max(1, deadline - time.time()))
        except (TimeoutError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"torchrun passed its {DEADLINE}s deadline:\n" + "".join(output[-20:]))
        if proc.returncode != 0:
            raise AssertionError(f"torchrun exited {proc.returncode}:\n" + "".join(output))
        if external_kill_at and not killed:
            raise AssertionError("the external kill found no worker to kill")
        with open(summary) as f:
            result = json.load(f)
        result["output"] = "".join(output)
        return result

    def reference(self, world, hook, model=()):
        key = (world, hook, tuple(model))
        if key not in self.references:
            self.references[key] = self.train(world, hook, list(model), restarts=0)["param_digest"]
        return self.references[key]


def expect_equal(runner, world, hook, result, min_restarts=1, model=()):
    assert result["restarts"] >= min_restarts, f"expected a restart, got {result['restarts']}"
    if hook == "noop" and result["resync_bytes"] > 0:
        # noop keeps no replicas: a rank whose own snapshot was still being written when
        # it died (seen on a loaded machine) is resynced from a peer's parameters, so the
        # run cannot match the uninterrupted one (hooks_ts/README.md).
        assert result["resumed_from_step"] > 0, "resynced but did not resume from a snapshot"
        print(f"NOTE {hook}: a lagging rank was resynced ({result['resync_bytes']} bytes); digest not compared")
        return
    want = runner.reference(world, hook, model)
    assert result["param_digest"] == want, f"digest {result['param_digest'][:16]} != uninterrupted {want[:16]}"


def cases(runner, workdir):
    out = []
    for world in (2, 3, 4):
        for i, hook in enumerate(HOOKS):
            phase = PHASES[(i + world) % len(PHASES)]
            rank, step = (i + world) % world, 13 + 3 * i + world
            if phase == "commit":
                step = 20 + 10 * (i % 2)  # a snapshot step: killed with the snapshot in flight

            def run(world=world, hook=hook, rank=rank, step=step, phase=phase):
                r = runner.train(world, hook, ["--fail-at", f"{rank}:{step}:{phase}"])
                expect_equal(runner, world, hook, r)

            out.append((f"kill w{world} {hook} rank {rank} step {step} {phase}", run))

    charlm = ("--model", "charlm")

    def charlm_kill(world, hook, spec):
        r = runner.train(world, hook, list(charlm) + ["--fail-at", spec])
        expect_equal(runner, world, hook, r, model=charlm)

    out += [("charlm w3 powersgd kill", lambda: charlm_kill(3, "powersgd", "1:27:hook")),
            ("charlm w4 allreduce kill", lambda: charlm_kill(4, "allreduce", "3:20:commit"))]

    def external():
        r = runner.train(2, "powersgd", [], external_kill_at=20)
        expect_equal(runner, 2, "powersgd", r)

    def replaced_node():
        ckpt = os.path.join(workdir, "replaced")
        runner.train(3, "powersgd", [], steps=25, ckpt=ckpt, restarts=0)
        shutil.rmtree(os.path.join(ckpt, "rank1"))
        r = runner.train(3, "powersgd", [], ckpt=ckpt, restarts=0)
        assert r["resync_bytes"] > 0, "nothing was resynced"
        assert r["param_digest"] == runner.reference(3, "powersgd"), "replaced node did not resume bit-exactly"

    def second_failure_in_recovery():
        r = runner.train(3, "topk", ["--fail-at", "1:23", "--fail-at", "2:0:resync@1"])
        expect_equal(runner, 3, "topk", r, min_restarts=2)

    def three_failures():
        r = runner.train(3, "powersgd", ["--fail-at", "1:13", "--fail-at", "0:26:hook@1", "--fail-at", "2:34:commit@2"])
        expect_equal(runner, 3, "powersgd", r, min_restarts=3)

    def full_restart():
        ckpt = os.path.join(workdir, "full")
        runner.train(2, "allreduce", [], steps=25, ckpt=ckpt, restarts=0)
        r = runner.train(2, "allreduce", [], ckpt=ckpt, restarts=0)
        assert r["resumed_from_step"] == 20, r["resumed_from_step"]
        assert r["param_digest"] == runner.reference(2, "allreduce")

    def new_hook_file():
        path = os.path.join(workdir, "half_mean.py")
        with open(path, "w") as f:
            f.write("from typing import Dict, List\nfrom torch import Tensor\n\n"
                    "def spec() -> Dict[str, List[str]]:\n    none: List[str] = []\n"
                    "    return {'replicated': none, 'local': none}\n\n"
                    "def params() -> Dict[str, float]:\n    return {'scale': 0.5}\n\n"
                    "def hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, "
                    "bucket: Bucket) -> Tensor:\n    b = bucket.buffer()\n"
                    "    b.mul_(params['scale'] / group.world_size())\n    return group.allreduce(b)\n")
        r = runner.train(2, path, ["--fail-at", "0:17:hook"])
        expect_equal(runner, 2, path, r)
        assert "half_mean" in r["hook"]

    def other_world_size():
        ckpt = os.path.join(workdir, "worlds")
        runner.train(2, "allreduce", [], steps=10, ckpt=ckpt, restarts=0)
        try:
            runner.train(3, "allreduce", [], steps=20, ckpt=ckpt, restarts=0)
        except AssertionError as e:
            assert "world size 2, this job has 3" in str(e) and "--ckpt" in str(e), str(e)[-2000:]
            return
        raise AssertionError("a checkpoint of world size 2 was accepted by a job of world size 3")

    out += [("checkpoint of another world size is refused", other_world_size), ("external kill -9", external), ("replaced node", replaced_node),
            ("second failure during recovery", second_failure_in_recovery), ("three failures", three_failures),
            ("full restart from the stores", full_restart), ("new hook file by path", new_hook_file)]
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ftcomm", required=True)
    parser.add_argument("-k", default="")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="ftcomm-e2e-")
    runner = Runner(os.path.abspath(args.ftcomm), workdir)
    passed = failed = 0
    try:
        for name, fn in cases(runner, workdir):
            if args.k not in name:
                continue
            start = time.time()
            try:
                fn()
                passed += 1
                print(f"PASS {name} ({time.time() - start:.1f}s)", flush=True)
            except Exception as e:  # noqa: BLE001 - report every failing case
                failed += 1
                print(f"FAIL {name}: {str(e)[-3000:]}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
