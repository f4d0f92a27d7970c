"""End-to-end: `ftcomm train` under torchrun with real failures resumes bit-exactly.

For world sizes 2 to 4 and every shipped hook, a run with a SIGKILL (at several
steps and phases, restarted by torchrun) must end with the same parameter digest as
an uninterrupted run. Further cases: an external kill -9 from this test, a replaced
node (one rank's store deleted), a second failure during recovery, three failures in
one run, a full restart from the stores alone, and a hook file written here and
deployed by path. Just-in-time commits (on by default): a kill at a random step and
phase with no periodic snapshots loses at most one step; PowerSGD and top-k under
both policies; a kill during the just-in-time save, two ranks killed at once, every
rank killed, a hung survivor, torchrun's SIGTERM. Resizes: a job stopped at world 4
and resumed by 3 ranks, then 4 again, twice to the same digest (the global batch
divided anew), PowerSGD's error feedback started afresh at a resize, and a resize
under a per-rank --batch refused. (Whole nodes lost under several torchrun agents:
multinode_test.py.) Every run has a deadline and is killed at it.

    python3 tests/e2e/train_recovery_test.py --ftcomm build/ftcomm [-k SUBSTRING | --case ID ...]
    python3 tests/e2e/train_recovery_test.py --list        # one case ID a line (ctest makes an entry of each)

Random choices (the jit cases' kill step and phase) use a fixed seed unless
FTCOMM_E2E_SEED is set (a number, or "random"); the seed in use is printed. The
uninterrupted reference runs are shared between invocations through --ref-cache.
"""
import argparse
import fcntl
import json
import os
import re
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from e2e_common import free_port, read_events

HOOKS = ["allreduce", "fp16_compress", "bf16_compress", "powersgd", "int8_quantize", "topk", "noop"]
PHASES = ["backward", "hook", "forward", "commit"]
STEPS = 40
DEADLINE = 240  # seconds per torchrun


def hook_args(hook):
    return ["--hook-arg", "start_iter=5", "--hook-arg", "rank=2"] if hook == "powersgd" else []


class Runner:
    def __init__(self, ftcomm, workdir, ref_cache=None):
        self.ftcomm, self.workdir, self.count = ftcomm, workdir, 0
        self.references = {}
        self.ref_cache = ref_cache
        st = os.stat(ftcomm)
        self.binary = f"{st.st_size}-{st.st_mtime_ns}"

    def command(self, world, restarts, args):
        return [sys.executable, "-m", "torch.distributed.run", "--no-python", f"--nproc-per-node={world}",
                f"--max-restarts={restarts}", "--monitor-interval=0.2", f"--master-port={free_port()}",
                self.ftcomm, "train", "--log-every", "10"] + args

    def train(self, world, hook, extra, steps=STEPS, ckpt=None, restarts=3, external_kill_at=None, expect_fail=False,
              commit_every=10, external_signal=signal.SIGKILL):
        self.count += 1
        ckpt = ckpt or os.path.join(self.workdir, f"run{self.count}")
        summary = os.path.join(self.workdir, f"run{self.count}.json")
        events_path = os.path.join(self.workdir, f"run{self.count}.events.jsonl")
        # noop keeps no replicas: a just-in-time resume would resync its lagging
        # rank from a peer (see expect_equal), so its runs keep periodic commits only.
        # And it communicates nothing: under the fail-fast agreement nothing in its
        # step is collective, so survivors would commit steps past a dead rank's and
        # resync it from a peer; the per-collective exchange keeps its ranks in step.
        # Its kill comes nine steps after a periodic snapshot (see cases()), which is
        # written in the background: paced steps give that write time to finish on a
        # loaded machine (a rank killed before it holds only the older snapshot and is
        # resynced from a peer, which noop cannot be).
        jit = ["--jit", "off", "--hook-agree", "per-collective", "--pace-ms", "60"] if hook == "noop" else []
        args = ["--steps", str(steps), "--hook", hook, "--ckpt", ckpt, "--commit-every", str(commit_every),
                "--summary-json", summary, "--events", events_path] + hook_args(hook) + jit + extra
        env = dict(os.environ, TORCH_FR_BUFFER_SIZE="0", PYTHONWARNINGS="ignore")
        proc = subprocess.Popen(self.command(world, restarts, args), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        output, killed = [], False
        deadline = time.time() + DEADLINE
        try:
            for line in proc.stdout:
                output.append(line)
                if external_kill_at and not killed and any(
                        e["event"] == "step" and e["step"] >= external_kill_at for e in read_events(events_path)):
                    workers = subprocess.run(["pgrep", "-f", f"{self.ftcomm} train .*{summary}"],
                                             capture_output=True, text=True).stdout.split()
                    workers = [int(p) for p in workers if int(p) != proc.pid]
                    if workers:
                        os.kill(workers[-1], external_signal)
                        killed = True
                if time.time() > deadline:
                    raise TimeoutError
            proc.wait(timeout=max(1, deadline - time.time()))
        except (TimeoutError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"torchrun passed its {DEADLINE}s deadline:\n" + "".join(output[-20:]))
        if expect_fail:
            if proc.returncode == 0:
                raise AssertionError("the run was expected to fail, but exited 0:\n" + "".join(output[-20:]))
            return {"output": "".join(output), "returncode": proc.returncode}
        if proc.returncode != 0:
            raise AssertionError(f"torchrun exited {proc.returncode}:\n" + "".join(output))
        if external_kill_at and not killed:
            raise AssertionError("the external kill found no worker to kill")
        with open(summary) as f:
            result = json.load(f)
        result["output"] = "".join(output)
        result["events"] = read_events(events_path)
        return result

    def reference(self, world, hook, model=(), what="param_digest"):
        """The uninterrupted run's result: computed once, and kept in --ref-cache (keyed by
        the arguments and the ftcomm binary) for the other cases of this build."""
        key = (world, hook, tuple(model))
        if key not in self.references:
            self.references[key] = self._cached_reference(world, hook, model)
        return self.references[key][what]

    def _cached_reference(self, world, hook, model):
        if not self.ref_cache or os.path.isabs(hook):  # a hook file of this invocation's workdir
            return self._reference_run(world, hook, model)
        os.makedirs(self.ref_cache, exist_ok=True)
        path = os.path.join(self.ref_cache, "-".join([f"w{world}", hook] + [m.strip("-") for m in model]) + ".json")
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another case computing the same reference: wait for it
            try:
                with open(path) as f:
                    cached = json.load(f)
                if cached.get("binary") == self.binary:
                    return cached
            except (OSError, ValueError):
                pass
            result = self._reference_run(world, hook, model)
            result["binary"] = self.binary
            with open(path + ".tmp", "w") as f:
                json.dump(result, f)
            os.replace(path + ".tmp", path)
            return result

    def _reference_run(self, world, hook, model):
        r = self.train(world, hook, list(model), restarts=0)
        return {"param_digest": r["param_digest"], "loss_last": r["loss_last"]}


def expect_equal(runner, world, hook, result, min_restarts=1, model=()):
    assert result["restarts"] >= min_restarts, f"expected a restart, got {result['restarts']}"
    if hook == "noop":
        # noop keeps no replicas, so the run matches the uninterrupted one only when
        # every rank resumes from its own snapshot: its kill comes nine steps after a
        # snapshot (see cases()), and a resync from a peer is a failure here.
        assert result["resync_bytes"] == 0, f"a noop rank was resynced from a peer: {result['resynced_ranks']}"
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
            if hook == "noop":
                # Ranks' parameters are not replicas under noop: kill nine steps after a
                # snapshot, so that every rank has its own and none is resynced from a peer.
                phase, step = "backward", 29

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

    def resized():
        """A job stopped at step 20 at world 4 and resumed by 3 ranks (the global
        batch of 98 divided anew, unevenly at both sizes), then grown back to 4:
        parameters and optimizer state carry over, the same resize repeated gives
        the same digest, and the resize is reported."""
        digests = []
        for attempt in range(2):
            ckpt = os.path.join(workdir, f"resize{attempt}")
            gb = ["--global-batch", "98"]
            first = runner.train(4, "allreduce", gb, steps=20, ckpt=ckpt, restarts=0)
            assert first["rank_batch"] == 25, first["rank_batch"]
            expect_in(first["output"], "does not divide by 4 ranks: ranks 0-1 take 25, the others 24")
            r = runner.train(3, "allreduce", gb, steps=30, ckpt=ckpt, restarts=0)
            assert (r["resumed_from_step"], r["resumed_world_size"], r["world_size"]) == (20, 4, 3), r
            expect_in(r["output"], "resized from world size 4 to 3 at step 20", "ranks 0-1 take 33, the others 32")
            grown = runner.train(4, "allreduce", gb, steps=40, ckpt=ckpt, restarts=0)
            assert (grown["resumed_from_step"], grown["resumed_world_size"]) == (30, 3), grown
            assert grown["resynced_ranks"] == [] or grown["resynced_ranks"] == [3], grown["resynced_ranks"]
            digests.append((r["param_digest"], grown["param_digest"]))
            # The bucket layout is kept across the resizes; inspect shows each commit's world size.
            data = json.loads(subprocess.run([runner.ftcomm, "inspect", "--json", os.path.join(ckpt, "rank0")],
                                             capture_output=True, text=True, check=True).stdout)
            assert len({c["layout_signature"] for c in data["commits"]}) == 1, data["commits"]
            assert [c["world_size"] for c in data["commits"]][-2:] == [3, 4], data["commits"]
        assert digests[0] == digests[1], f"the same resize gave different digests: {digests}"
        # Without --global-batch the global batch would change with the world size: refused, naming the fix.
        ckpt = os.path.join(workdir, "resize-refused")
        runner.train(2, "allreduce", [], steps=10, ckpt=ckpt, restarts=0)
        refused = runner.train(3, "allreduce", [], steps=20, ckpt=ckpt, restarts=0, expect_fail=True)
        expect_in(refused["output"], "'global_batch' was 64 in the checkpoint and is 96 now", "--allow-change")

    def resized_powersgd():
        """PowerSGD's error feedback is rank-local: a resize starts it afresh on
        every rank (reported), its replicated state carries over."""
        ckpt = os.path.join(workdir, "resize-powersgd")
        runner.train(3, "powersgd", ["--global-batch", "96"], steps=20, ckpt=ckpt, restarts=0)
        r = runner.train(2, "powersgd", ["--global-batch", "96"], steps=30, ckpt=ckpt, restarts=0)
        assert (r["resumed_from_step"], r["resumed_world_size"]) == (20, 3), r
        assert r["local_state_reset"] == [0, 1], r["local_state_reset"]
        expect_in(r["local_state"], "every rank's reset (world size 3 -> 2)")
        recovery = [e for e in r["events"] if e["event"] == "recovery"][-1]
        assert (recovery["world_size"], recovery["resumed_world_size"]) == (2, 3), recovery

    out += reliability_cases(runner, workdir)
    out += jit_cases(runner, workdir)
    out += [("resized 4 -> 3 -> 4", resized), ("resized powersgd 3 -> 2", resized_powersgd), ("external kill -9", external), ("replaced node", replaced_node),
            ("second failure during recovery", second_failure_in_recovery), ("three failures", three_failures),
            ("full restart from the stores", full_restart), ("new hook file by path", new_hook_file)]
    return out


HOOKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "hooks")


def expect_in(text, *needles):
    for n in needles:
        assert n in text, f"expected {n!r} in:\n{text[-3000:]}"


def expect_whole_lines(output):
    # Ranks share torchrun's stderr: each of ftcomm's lines must come out whole.
    for line in output.splitlines():
        # Paths may name ftcomm too (torchrun's "of binary: /ftcomm/build/ftcomm" in a
        # checkout at /ftcomm): only the words count.
        words = re.sub(r"\S*/\S*", "", line)
        assert words.count("ftcomm") <= 1 or line.startswith("ftcomm"), f"interleaved line: {line!r}"
        head = line.find("ftcomm train (rank")
        assert head <= 0, f"a rank's error starts mid-line: {line!r}"


def damage(path, how):
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(100)
    elif how == "flip":
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
    else:
        os.remove(path)


def blob(ckpt, rank, step):
    return os.path.join(ckpt, f"rank{rank}", "blobs", f"step-{step:020d}.blob")


def reliability_cases(runner, workdir):
    """The adversarial findings (issue: no silent data loss, no unbounded hang)."""
    out = []

    def damaged_store_never_overwritten():
        ckpt = os.path.join(workdir, "nocurrent")
        runner.train(2, "allreduce", [], steps=25, ckpt=ckpt, restarts=0)
        saved = {}
        for r in range(2):
            path = os.path.join(ckpt, f"rank{r}", "CURRENT")
            saved[path] = open(path).read()
            os.remove(path)
        for attempt in range(2):  # refused every time, never "starting at step 0"
            r = runner.train(2, "allreduce", [], ckpt=ckpt, restarts=1, expect_fail=True)
            expect_in(r["output"], "no CURRENT", "nothing was written")
            assert "starting at step 0" not in r["output"], r["output"][-2000:]
            expect_whole_lines(r["output"])
        for path, text in saved.items():
            with open(path, "w") as f:
                f.write(text)
        r = runner.train(2, "allreduce", [], ckpt=ckpt, restarts=0)
        assert r["resumed_from_step"] == 20, r["resumed_from_step"]
        assert r["param_digest"] == runner.reference(2, "allreduce")

    def damaged_newest_snapshot_everywhere():
        for how in ("truncate", "flip", "delete"):
            ckpt = os.path.join(workdir, f"newest-{how}")
            runner.train(2, "powersgd", [], steps=35, ckpt=ckpt, restarts=0)
            for r in range(2):
                damage(blob(ckpt, r, 30), how)
            r = runner.train(2, "powersgd", [], ckpt=ckpt, restarts=0)
            assert r["resumed_from_step"] == 20, (how, r["resumed_from_step"])
            assert r["newest_snapshot_step"] == 30, r
            assert r["discarded_steps"] == [30], r
            expect_in(r["output"], "damaged on every rank", "resuming from step 20")
            recovery = [e for e in r["events"] if e["event"] == "recovery"]
            assert recovery and recovery[0]["resumed_from_step"] == 20 and recovery[0]["newest_snapshot_step"] == 30, recovery
            discarded = sorted(e["rank"] for e in r["events"] if e["event"] == "discarded" and e["steps"] == [30])
            assert discarded == [0, 1], r["events"]
            assert r["param_digest"] == runner.reference(2, "powersgd"), how

    def damaged_newest_with_a_lagging_peer():
        # Rank 0's newest (step 30) is damaged and rank 1 only reached step 20.
        ckpt = os.path.join(workdir, "lagging")
        runner.train(2, "powersgd", [], steps=25, ckpt=ckpt, restarts=0)
        shutil.copytree(os.path.join(ckpt, "rank1"), os.path.join(workdir, "lagging-rank1"))
        runner.train(2, "powersgd", [], steps=35, ckpt=ckpt, restarts=0)
        shutil.rmtree(os.path.join(ckpt, "rank1"))
        shutil.copytree(os.path.join(workdir, "lagging-rank1"), os.path.join(ckpt, "rank1"))
        damage(blob(ckpt, 0, 30), "flip")
        r = runner.train(2, "powersgd", [], ckpt=ckpt, restarts=0)
        assert r["resumed_from_step"] == 20, r["resumed_from_step"]
        assert r["param_digest"] == runner.reference(2, "powersgd")

    def changed_settings_refused():
        ckpt = os.path.join(workdir, "settings")
        base = ["--hook-arg", "start_iter=5"]
        runner.train(2, "powersgd", base + ["--hook-arg", "rank=2"], steps=20, ckpt=ckpt, restarts=0)
        for extra, needle in ((["--hook-arg", "rank=1"], "'hook.rank' was 2 in the checkpoint and is 1 now"),
                              (["--hook-arg", "rank=2", "--lr", "0.1"], "'lr' was 0.05 in the checkpoint and is 0.1 now"),
                              (["--hook-arg", "rank=2", "--batch", "16"], "'global_batch' was 64 in the checkpoint and is 32 now")):
            cmd = ["--steps", "30", "--hook", "powersgd", "--ckpt", ckpt] + base + extra
            proc = subprocess.run(runner.command(2, 0, cmd), capture_output=True, text=True, timeout=DEADLINE,
                                  env=dict(os.environ, TORCH_FR_BUFFER_SIZE="0", PYTHONWARNINGS="ignore"))
            assert proc.returncode != 0, f"a change ({extra}) was accepted"
            expect_in(proc.stdout + proc.stderr, needle, "--allow-change")
        r = runner.train(2, "powersgd", ["--hook-arg", "start_iter=5", "--hook-arg", "rank=2", "--lr", "0.1",
                                         "--allow-change", "lr"], steps=30, ckpt=ckpt, restarts=0)
        assert r["resumed_from_step"] == 20 and r["changed_settings"] == ["lr: 0.05 -> 0.1"], r

    def int64_local_state_from_a_buddy():
        hook = os.path.join(HOOKS_DIR, "int64_counter.py")
        ckpt = os.path.join(workdir, "int64")
        runner.train(3, hook, [], steps=25, ckpt=ckpt, restarts=0)
        shutil.rmtree(os.path.join(ckpt, "rank1"))
        r = runner.train(3, hook, [], ckpt=ckpt, restarts=0)
        assert r["param_digest"] == runner.reference(3, hook), "int64 state did not come back bit-exactly"
        expect_in(r["local_state"], "rank 1: restored from rank 2's buddy copy")

    def two_adjacent_stores_lost():
        ckpt = os.path.join(workdir, "adjacent")
        runner.train(3, "powersgd", [], steps=25, ckpt=ckpt, restarts=0)
        for rank in (1, 2):
            shutil.rmtree(os.path.join(ckpt, f"rank{rank}"))
        r = runner.train(3, "powersgd", [], ckpt=ckpt, restarts=0)
        # Rank 2's copy lives on rank 0; rank 1's lived on rank 2, also lost.
        expect_in(r["local_state"], "rank 1: reset to empty", "rank 2: restored from rank 0's buddy copy")
        line = [l for l in r["output"].splitlines() if l.startswith("ftcomm train: resumed")][0]
        expect_in(line, "rank 1: reset to empty")

    def steps_below_the_checkpoint():
        ckpt = os.path.join(workdir, "below")
        runner.train(2, "allreduce", [], steps=25, ckpt=ckpt, restarts=0)
        r = runner.train(2, "allreduce", [], steps=15, ckpt=ckpt, restarts=0, expect_fail=True)
        expect_in(r["output"], "is at step 20, beyond --steps 15")
        r = runner.train(2, "allreduce", [], steps=20, ckpt=ckpt, restarts=0)
        assert r["steps_trained"] == 0 and r["loss_last"] is None, r

    def stuck_hook(stuck_rank):
        hook = os.path.join(HOOKS_DIR, "stuck.py")
        start = time.time()
        r = runner.train(2, hook, ["--hook-arg", f"stuck_rank={stuck_rank}", "--timeout", "8"], restarts=0,
                         expect_fail=True)
        took = time.time() - start
        expect_in(r["output"], "hook stuck did not return within 4 s on rank")
        if stuck_rank >= 0:
            # The stuck rank names itself; its peer finds the record and reports the
            # same error (the stuck rank waits for that before it exits, so
            # torchrun's SIGTERM does not overtake the peer's error path).
            expect_in(r["output"], f"within 4 s on rank {stuck_rank} in bucket")
            peer = f"ftcomm train (rank {1 - stuck_rank}): hook stuck did not return within 4 s on rank {stuck_rank}"
            expect_in(r["output"], peer, "(the ranks agreed: recorded by rank")
        assert took < 60, f"a stuck hook took {took:.0f}s to end the job"

    def file_size_limit():
        ckpt = os.path.join(workdir, "fsize")
        proc = subprocess.run(["bash", "-c", f'ulimit -f 300; exec "$0" train --ckpt {ckpt} --steps 12 --commit-every 10',
                               runner.ftcomm], capture_output=True, text=True, timeout=DEADLINE)
        assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # an error, not SIGXFSZ
        expect_in(proc.stderr, "ulimit -f")
        blobs = os.listdir(os.path.join(ckpt, "rank0", "blobs"))
        assert blobs == [], f"left behind: {blobs}"

    def events_of_a_failure():
        r = runner.train(2, "allreduce", ["--fail-at", "1:13"])
        ev = r["events"]
        kinds = [(e["event"], e["rank"], e["attempt"]) for e in ev]
        for want in (("start", 0, 0), ("start", 1, 0), ("failure_injected", 1, 0), ("start", 0, 1), ("start", 1, 1),
                     ("recovery", 0, 1), ("done", 0, 1)):
            assert want in kinds, f"no {want} event in {kinds}"
        failure = next(e for e in ev if e["event"] == "failure_injected")
        assert failure["step"] == 13 and failure["phase"] == "backward", failure
        recovery = next(e for e in ev if e["event"] == "recovery" and e["attempt"] == 1)
        # Rank 0 saved step 12 just in time when its peer's death broke step 13.
        assert recovery["resumed_from_step"] == 12 and {"agreement_ms", "load_ms", "resync_ms"} <= set(recovery)
        assert recovery["resumed_just_in_time"] and recovery["steps_lost"] == 0 and recovery["policy"] == "exact"
        saved = [e for e in ev if e["event"] == "jit_saved" and e["rank"] == 0]
        assert saved and saved[0]["step"] == 12 and saved[0]["saved"], saved
        steps = [e["step"] for e in ev if e["event"] == "step" and e["attempt"] == 1]
        assert steps == list(range(13, STEPS + 1)), steps
        done = next(e for e in ev if e["event"] == "done")
        assert done["param_digest"] == r["param_digest"] == runner.reference(2, "allreduce")

    def refused_resume_discards_nothing():
        # Issue 28, item 1: rank 1 dies in step 25, rank 0 saves step 24 just in
        # time. A relaunch with another hook is refused (its exact plan would pass
        # over step 24), and must not discard step 24 first: the correct relaunch
        # still resumes there.
        ckpt = os.path.join(workdir, "refused-keeps")
        runner.train(2, "allreduce", ["--fail-at", "1:25:hook"], ckpt=ckpt, restarts=0, expect_fail=True)
        r = runner.train(2, "powersgd", [], ckpt=ckpt, restarts=0, expect_fail=True)
        expect_in(r["output"], "refusing to resume from step 20", "othing was discarded")
        assert "discarded commits" not in r["output"], r["output"][-3000:]
        r = runner.train(2, "allreduce", [], ckpt=ckpt, restarts=0)
        assert r["resumed_from_step"] == 24 and r["resumed_just_in_time"], r
        assert r["param_digest"] == runner.reference(2, "allreduce")

    def finished_job_continues_without_periodic_commits():
        # Issue 28, item 4: with --commit-every 0 the last step is committed at the end.
        ckpt = os.path.join(workdir, "continue")
        runner.train(2, "allreduce", [], steps=15, ckpt=ckpt, restarts=0, commit_every=0)
        r = runner.train(2, "allreduce", [], steps=STEPS, ckpt=ckpt, restarts=0, commit_every=0)
        assert r["resumed_from_step"] == 15 and r["steps_trained"] == STEPS - 15, r
        assert r["param_digest"] == runner.reference(2, "allreduce")

    out += [("a refused resume discards nothing", refused_resume_discards_nothing),
            ("commit-every 0: a finished job can be continued", finished_job_continues_without_periodic_commits),
            ("structured events of a run with a failure", events_of_a_failure),
            ("damaged store (CURRENT lost) is refused and never overwritten", damaged_store_never_overwritten),
            ("damaged newest snapshot on every rank falls back", damaged_newest_snapshot_everywhere),
            ("damaged newest snapshot with a lagging peer", damaged_newest_with_a_lagging_peer),
            ("changed settings are refused unless allowed", changed_settings_refused),
            ("int64 rank-local state from a buddy copy", int64_local_state_from_a_buddy),
            ("two adjacent stores lost: the reset is reported", two_adjacent_stores_lost),
            ("--steps below the checkpoint is refused", steps_below_the_checkpoint),
            ("a hook stuck on one rank is named", lambda: stuck_hook(1)),
            ("a hook stuck on every rank ends the job", lambda: stuck_hook(-1)),
            ("a file-size limit is an error, with nothing left behind", file_size_limit)]
    return out


def _seed():
    # Fixed by default, so that a CI run repeats; FTCOMM_E2E_SEED=random draws one.
    text = os.environ.get("FTCOMM_E2E_SEED", "1")
    return int(time.time() * 1000) % 100000 if text == "random" else int(text)


SEED = _seed()


def jit_cases(runner, workdir):
    """Just-in-time commits (the issue: lose at most one step per failure)."""
    out = []
    rng = random.Random(SEED)
    phases = ["forward", "backward", "hook", "update", "commit"]

    def expect_lost_at_most_one(r, fail_step):
        assert fail_step - 1 <= r["resumed_from_step"] <= fail_step, \
            f"killed in step {fail_step}, resumed from {r['resumed_from_step']}: more than one step lost"
        assert r["resumed_just_in_time"], r

    # Hooks without rank-local state, no periodic snapshot at all, a kill at a
    # random step and phase (the seed is printed; FTCOMM_E2E_SEED repeats it).
    for hook in ("allreduce", "fp16_compress", "bf16_compress", "int8_quantize"):
        step, phase, rank = rng.randint(3, STEPS - 3), rng.choice(phases), rng.randint(0, 1)

        def run(hook=hook, step=step, phase=phase, rank=rank):
            print(f"  rank {rank} killed at step {step} {phase} (seed {SEED})", flush=True)
            r = runner.train(2, hook, ["--fail-at", f"{rank}:{step}:{phase}"], commit_every=0)
            expect_equal(runner, 2, hook, r)
            expect_lost_at_most_one(r, step)

        out.append((f"jit w2 {hook} no periodic commits, a seeded random kill", run))

    def stateful(hook, policy):
        r = runner.train(2, hook, ["--fail-at", "1:17:hook", "--jit-policy", policy])
        assert r["policy"] == policy and r["newest_step"] == 16, r
        if policy == "exact":
            # Rank 1's error feedback exists only at the periodic commit of step 10.
            assert r["resumed_from_step"] == 10 and r["steps_lost"] == 6 and not r["resumed_just_in_time"], r
            expect_in(r["output"], "resuming from step 10, not the newest step 16")
            expect_equal(runner, 2, hook, r)
        else:
            assert r["resumed_from_step"] == 16 and r["resumed_just_in_time"] and r["local_state_reset"] == [1], r
            expect_in(r["local_state"], "rank 1: reset to empty")
            want = runner.reference(2, hook, what="loss_last")
            assert abs(r["loss_last"] - want) <= 0.15 * want, f"loss {r['loss_last']} far from uninterrupted {want}"

    for hook in ("powersgd", "topk"):
        for policy in ("exact", "reset"):
            out.append((f"jit w2 {hook} policy {policy}", lambda hook=hook, policy=policy: stateful(hook, policy)))

    def killed_during_the_save():
        # Rank 1 dies in step 17; rank 0 is killed inside its just-in-time save
        # of step 16: both fall back to the periodic commit of step 10, intact.
        r = runner.train(2, "allreduce", ["--fail-at", "1:17:hook", "--fail-at", "0:0:jit"])
        assert r["resumed_from_step"] == 10 and not r["resumed_just_in_time"], r
        expect_equal(runner, 2, "allreduce", r)
        assert any(e["event"] == "failure_injected" and e["phase"] == "jit" for e in r["events"]), r["events"]

    def two_ranks_at_once():
        r = runner.train(4, "fp16_compress", ["--fail-at", "1:21:backward", "--fail-at", "2:21:backward"],
                         commit_every=0)
        assert r["resumed_from_step"] == 20 and r["resynced_ranks"] == [1, 2], r
        expect_equal(runner, 4, "fp16_compress", r)

    def every_rank(commit_every, want):
        # Paced: the step-10 snapshot, written in the background, must be on disk
        # before both ranks die at step 17, also on a loaded machine.
        r = runner.train(2, "allreduce", ["--fail-at", "0:17:hook", "--fail-at", "1:17:hook", "--pace-ms", "60"],
                         commit_every=commit_every)
        assert r["resumed_from_step"] == want, r
        expect_equal(runner, 2, "allreduce", r)

    def hung_survivor():
        # Rank 1 hangs (SIGSTOP) in step 13; rank 0's step stalls past 0.9 x
        # --timeout, it saves step 12 and exits; torchrun SIGKILLs the hung rank
        # (30 s after its SIGTERM) and restarts the job.
        r = runner.train(2, "allreduce", ["--fail-at", "1:13:hang", "--timeout", "8"], commit_every=0)
        expect_in(r["output"], "step 13 stalled for more than 7200 ms", "saved step 12 just in time")
        assert r["resumed_from_step"] == 12, r
        expect_equal(runner, 2, "allreduce", r)

    def sigterm():
        # torchrun's SIGTERM, sent here to one worker: it saves its last finished
        # step and exits 143; its peer's next collective fails and it saves too.
        r = runner.train(2, "allreduce", [], steps=400, commit_every=0, external_kill_at=150,
                         external_signal=signal.SIGTERM)
        expect_in(r["output"], "SIGTERM; saving step")
        saved = [e for e in r["events"] if e["event"] == "jit_saved" and e["reason"] == "SIGTERM"]
        assert saved and saved[0]["saved"], r["events"][-5:]
        assert r["resumed_just_in_time"] and r["resumed_from_step"] >= saved[0]["step"], r
        assert r["param_digest"] == runner.train(2, "allreduce", [], steps=400, restarts=0)["param_digest"]

    def inspect_shows_jit():
        ckpt = os.path.join(workdir, "jit-inspect")
        runner.train(2, "allreduce", ["--fail-at", "1:17:hook"], ckpt=ckpt, commit_every=0)
        text = subprocess.run([runner.ftcomm, "inspect", os.path.join(ckpt, "rank0")], capture_output=True,
                              text=True, check=True).stdout
        expect_in(text, "just-in-time", "step 16 was saved just in time (error:")
        data = json.loads(subprocess.run([runner.ftcomm, "inspect", "--json", os.path.join(ckpt, "rank0")],
                                         capture_output=True, text=True, check=True).stdout)
        jit = [c for c in data["commits"] if c["kind"] == "just-in-time"]
        assert [c["step"] for c in jit] == [16] and jit[0]["jit_reason"].startswith("error:"), data["commits"]

    out += [("jit: a kill during the just-in-time save falls back to the periodic commit", killed_during_the_save),
            ("jit w4: two ranks killed at once", two_ranks_at_once),
            ("jit: every rank killed, periodic commits", lambda: every_rank(10, 10)),
            ("jit: every rank killed, no periodic commits (fresh start)", lambda: every_rank(0, -1)),
            ("jit: a hung survivor saves on its stalled step", hung_survivor),
            ("jit: torchrun's SIGTERM saves the last finished step", sigterm),
            ("jit: inspect shows just-in-time commits", inspect_shows_jit)]
    return out


def case_id(name):
    """A case's name as a ctest-friendly ID: 'kill w2 allreduce rank 0 ...' -> kill_w2_allreduce_rank_0_..."""
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ftcomm", help="the ftcomm binary (required unless --list)")
    parser.add_argument("-k", default="", help="run the cases whose name contains this")
    parser.add_argument("--case", action="append", default=[], help="run the case with this ID (repeatable)")
    parser.add_argument("--list", action="store_true", help="print every case's ID and exit")
    parser.add_argument("--ref-cache", help="directory for the uninterrupted reference runs, shared between runs")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="ftcomm-e2e-")
    try:
        if args.list:
            runner = Runner.__new__(Runner)  # cases() only names the runs
            print("\n".join(case_id(name) for name, _ in cases(runner, workdir)))
            return 0
        if not args.ftcomm:
            parser.error("--ftcomm is required")
        print(f"e2e: random choices seeded with {SEED} (FTCOMM_E2E_SEED=N repeats them, =random draws)", flush=True)
        runner = Runner(os.path.abspath(args.ftcomm), workdir, args.ref_cache)
        selected = [(n, fn) for n, fn in cases(runner, workdir)
                    if args.k in n and (not args.case or case_id(n) in args.case)]
        unknown = set(args.case) - {case_id(n) for n, _ in selected}
        if unknown:
            print(f"e2e: no case with ID {', '.join(sorted(unknown))} (--list prints them)", flush=True)
            return 2
        passed = failed = 0
        for name, fn in selected:
            start = time.time()
            try:
                fn()
                passed += 1
                print(f"PASS {name} ({time.time() - start:.1f}s)", flush=True)
            except Exception as e:  # noqa: BLE001 - report every failing case
                failed += 1
                print(f"FAIL {name}: {str(e)[-3000:]}", flush=True)
        print(f"{passed} passed, {failed} failed")
        return 1 if failed or not passed else 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
