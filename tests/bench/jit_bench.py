"""Just-in-time commits against periodic ones and a torch::save restart, with
`ftcomm train` under torchrun (one run of this script, same machine, same model):

* steady state: ms per step with no fault tolerance at all (no --ckpt), with
  just-in-time commits and no periodic snapshot (--commit-every 0), and with
  periodic snapshots at K=1 and K=10 (just-in-time on as well); rounds
  interleave the modes, medians are reported, and the ratio to "none";
* a failure: rank 1 SIGKILLed in the middle of step --kill-at (its hook), torchrun
  restarts the job: the steps lost (work redone: --kill-at minus the resumed
  step), the seconds from the kill to the end of the first step after the
  restart, and whether the final parameters equal an uninterrupted run's
  (checked on the runs that were timed).

    python3 tests/bench/jit_bench.py --ftcomm build/ftcomm [--torch-save-train build/tests/ftcomm_bench_torch_save]
        [--world 2] [--model charlm] [--device cpu] [--steps 200] [--rounds 3] [--skip-steady] [--skip-failures]

The torch::save baseline runs ftcomm train's loop with torch::save in place of the
store (tests/bench/torch_save_train.cpp).
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(a, workdir, name, extra, restarts=0):
    """One torchrun of `ftcomm train` (or, when `extra` starts with --every, of the
    torch::save baseline); returns (summary, events)."""
    summary = os.path.join(workdir, name + ".json")
    events = os.path.join(workdir, name + ".events")
    trainer = [a.torch_save_train] if extra[:1] == ["--every"] else [a.ftcomm, "train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--no-python", f"--nproc-per-node={a.world}",
           f"--max-restarts={restarts}", "--monitor-interval=0.1", f"--master-port={free_port()}"] + trainer + [
           "--model", a.model, "--device", a.device, "--steps", str(a.steps), "--log-every", "0", "--summary-json", summary,
           "--events", events] + extra
    env = dict(os.environ, TORCH_FR_BUFFER_SIZE="0", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}")
    with open(summary) as f:
        result = json.load(f)
    with open(events) as f:
        evs = [json.loads(line) for line in f if line.endswith("\n")]
    return result, evs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ftcomm", required=True)
    p.add_argument("--torch-save-train", default="",
                   help="the torch::save baseline (default: tests/ftcomm_bench_torch_save beside --ftcomm)")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--model", default="charlm")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (ranks share the GPUs round-robin)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kill-at", type=int, default=25, help="step in which rank 1 dies (failure runs)")
    p.add_argument("--fail-steps", type=int, default=40, help="--steps of the failure runs")
    p.add_argument("--skip-steady", action="store_true")
    p.add_argument("--skip-failures", action="store_true")
    a = p.parse_args()
    a.torch_save_train = a.torch_save_train or os.path.join(os.path.dirname(os.path.abspath(a.ftcomm)), "tests",
                                                            "ftcomm_bench_torch_save")
    workdir = tempfile.mkdtemp(prefix="ftcomm-jit-bench-")
    print(f"ftcomm train --model {a.model} --device {a.device}, world {a.world} ({os.cpu_count()} cores)", flush=True)
    try:
        if not a.skip_steady:
            modes = {"none (no fault tolerance)": [],
                     "just in time, no periodic (K=0)": ["--commit-every", "0"],
                     "just in time + periodic K=10": ["--commit-every", "10"],
                     "just in time + periodic K=1": ["--commit-every", "1"],
                     "periodic K=10, just in time off": ["--commit-every", "10", "--jit", "off"]}
            times = {m: [] for m in modes}
            jit_ms = {m: [] for m in modes}
            digests = set()
            for r in range(a.rounds):
                for m, extra in modes.items():
                    ckpt = ["--ckpt", os.path.join(workdir, f"steady-{r}-{len(times[m])}-{hash(m) & 0xffff}")] \
                        if extra else []
                    res, _ = run(a, workdir, f"steady{r}-{list(modes).index(m)}", ckpt + extra)
                    times[m].append(res["train_ms"] / res["steps_trained"])
                    jit_ms[m].append(res["jit_ms"] / res["steps_trained"])
                    digests.add(res["param_digest"])
            base = statistics.median(times["none (no fault tolerance)"])
            print(f"\nsteady state, {a.steps} steps, {a.rounds} interleaved rounds, median ms/step "
                  f"(every run's final parameters {'equal' if len(digests) == 1 else 'DIFFER'}):")
            print("| mode | ms/step | x none | rounds | in just-in-time calls, ms/step (x step) |\n"
                  "| --- | --- | --- | --- | --- |")
            for m, ts in times.items():
                med, inside = statistics.median(ts), statistics.median(jit_ms[m])
                print(f"| {m} | {med:.2f} | {med / base:.3f} | {', '.join(f'{t:.2f}' for t in ts)} | "
                      f"{inside:.4f} ({inside / med:.5f}) |", flush=True)

        if a.skip_failures:
            return
        a.steps = a.fail_steps
        reference, _ = run(a, workdir, "reference", [])
        kill = ["--fail-at", f"1:{a.kill_at}:hook"]
        failures = {"ftcomm just in time, no periodic (K=0)": ["--commit-every", "0"],
                    "ftcomm periodic K=1 (just in time off)": ["--commit-every", "1", "--jit", "off"],
                    "ftcomm periodic K=10 (just in time off)": ["--commit-every", "10", "--jit", "off"],
                    "torch::save K=10, torch::load on restart": ["--every", "10"],
                    "torch::save K=1, torch::load on restart": ["--every", "1"]}
        print(f"\nrank 1 SIGKILLed in step {a.kill_at} (in its hook), torchrun --max-restarts=1, {a.fail_steps} steps; "
              f"{a.rounds} tries each, medians:")
        print("| method | steps lost | kill -> first step after restart (s) | tries (s) | final parameters |\n"
              "| --- | --- | --- | --- | --- |")
        for m, extra in failures.items():
            lost, secs, same = [], [], []
            for t in range(a.rounds):
                ckpt = os.path.join(workdir, f"fail-{t}-{hash(m) & 0xffff}")
                res, evs = run(a, workdir, f"fail{t}-{list(failures).index(m)}", extra + ["--ckpt", ckpt] + kill,
                               restarts=1)
                killed = next(e for e in evs if e["event"] == "failure_injected")
                first = min((e for e in evs if e["event"] == "step" and e["attempt"] == 1), key=lambda e: e["step"])
                lost.append(a.kill_at - (first["step"] - 1))
                secs.append((first["unix_ms"] - killed["unix_ms"]) / 1000)
                same.append(res["param_digest"] == reference["param_digest"])
                shutil.rmtree(ckpt, ignore_errors=True)
            verdict = "equal" if all(same) else ("differ" if not any(same) else f"equal in {sum(same)} of {len(same)}")
            print(f"| {m} | {', '.join(map(str, lost))} | {statistics.median(secs):.2f} | "
                  f"{', '.join(f'{s:.2f}' for s in secs)} | {verdict} |", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
