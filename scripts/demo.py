"""The ftcomm demo: 4 ranks of `ftcomm train --model charlm` under torchrun on the embedded default
(CPU, Gloo, local stores under a temp dir) with the powersgd hook. One run has a rank
killed mid-training and recovers; the same run is repeated without a failure. Prints
a table (steps, failure and recovery times by phase, resync bytes, digest equal) and
writes a picture of both loss curves with the failure marked.

    python3 scripts/demo.py --ftcomm build/ftcomm [--out DIR] [--steps N] [--fail-step N]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_events(path):
    """ftcomm train's --events file: one JSON object a line."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run(ftcomm, workdir, name, steps, extra):
    summary = os.path.join(workdir, name + ".json")
    events_path = os.path.join(workdir, name + ".events.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--no-python", "--nproc-per-node=4", "--max-restarts=2",
           "--monitor-interval=0.2", f"--master-port={free_port()}", ftcomm, "train", "--model", "charlm", "--steps", str(steps),
           "--hook", "powersgd", "--hook-arg", "start_iter=5", "--hook-arg", "rank=2", "--commit-every", "10",
           "--log-every", "10", "--ckpt", os.path.join(workdir, name), "--summary-json", summary,
           "--events", events_path] + extra
    print(f"demo: {name}: torchrun --nproc-per-node=4 ftcomm train --model charlm --hook powersgd " + " ".join(extra),
          flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    for line in proc.stdout:  # the human progress, passed through
        if line.startswith("step ") or line.startswith("ftcomm train:"):
            print("  " + line.strip(), flush=True)
    if proc.wait(timeout=600) != 0:
        sys.exit(f"demo: {name} failed (exit {proc.returncode})")
    with open(summary) as f:
        result = json.load(f)
    events = read_events(events_path)
    losses = [(e["step"], e["loss"]) for e in events if e["event"] == "step"]
    times = {}
    for e in events:
        t = e["unix_ms"] / 1000.0
        if e["event"] == "failure_injected":
            times.setdefault("failure", t)
        elif e["event"] == "start" and e["attempt"] >= 1:
            times["rendezvous"] = min(times.get("rendezvous", t), t)
        elif e["event"] == "recovery" and e["attempt"] >= 1:
            times.setdefault("resumed", t)
    return result, losses, times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ftcomm", required=True)
    parser.add_argument("--out", default=".")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--fail-step", type=int, default=47)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="ftcomm-demo-")
    print(f"demo: stores under {workdir}", flush=True)
    failed, failed_losses, ev = run(args.ftcomm, workdir, "with-failure", args.steps,
                                    ["--fail-at", f"2:{args.fail_step}:backward"])
    clean, clean_losses, _ = run(args.ftcomm, workdir, "no-failure", args.steps, [])
    rec = failed
    restart_s = ev.get("rendezvous", ev.get("resumed", 0)) - ev.get("failure", 0)
    rows = [
        ("steps", f"{args.steps} (killed rank 2 at step {args.fail_step}; resumed from {failed['resumed_from_step']})"),
        ("restarts", str(failed["restarts"])),
        ("failure -> new group formed", f"{restart_s * 1000:.0f} ms (torchrun restart + rendezvous)"),
        ("agreement on the step", f"{rec['agreement_ms']:.1f} ms"),
        ("load from the local store", f"{rec['load_ms']:.1f} ms"),
        ("resync", f"{rec['resync_ms']:.1f} ms, {failed['resync_bytes']} bytes"),
        ("first step after recovery", f"{rec['first_step_ms']:.1f} ms"),
        ("lost work", f"{args.fail_step - 1 - failed['resumed_from_step']} steps (commit every 10)"),
        ("final digest, failure run", failed["param_digest"][:16]),
        ("final digest, clean run", clean["param_digest"][:16]),
        ("digest equal", "yes" if failed["param_digest"] == clean["param_digest"] else "NO"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    picture = os.path.join(args.out, "demo-loss.png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([s for s, _ in clean_losses], [l for _, l in clean_losses], label="no failure", lw=2)
        ax.plot([s for s, _ in failed_losses], [l for _, l in failed_losses], "--", label="with failure (resumed)", lw=1.5)
        ax.axvline(args.fail_step, color="red", ls=":", label=f"rank 2 killed at step {args.fail_step}")
        ax.axvline(failed["resumed_from_step"], color="gray", ls=":", label=f"resumed from step {failed['resumed_from_step']}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (rank 0)")
        ax.set_title("ftcomm train, charlm, 4 ranks, powersgd: loss with and without a failure")
        ax.legend()
        fig.tight_layout()
        fig.savefig(picture, dpi=110)
        print(f"\ndemo: loss curves in {picture}")
    except ImportError:
        print("\ndemo: matplotlib is missing; no picture (scripts/demo.sh installs it)")
    return 0 if failed["param_digest"] == clean["param_digest"] else 1


if __name__ == "__main__":
    sys.exit(main())
