"""torchrun --max-restarts=2 with rank 1 SIGKILLed in the first attempt: how often the
job comes back with torch.distributed.init_process_group("gloo") (the baseline) and
with ftcomm.init_process_group(), and how long it takes.

    python3 tests/bench/restart_bench.py [--tries 3] [--deadline 120]
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROBE = os.path.join(HERE, "..", "python", "restart_probe.py")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--deadline", type=float, default=120)
    a = p.parse_args()
    for init in ("plain", "ftcomm"):
        results = []
        for _ in range(a.tries):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   "--max-restarts=2", "--monitor-interval=0.2", PROBE, "--init", init]
            t0 = time.time()
            try:
                out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     timeout=a.deadline, start_new_session=True).stdout
                ok = "probe: attempt" in out and " ok " in out
                why = "ok" if ok else ("connectFullMesh" if "connectFullMesh" in out else "failed")
            except subprocess.TimeoutExpired:
                ok, why = False, f"hung past {a.deadline:g}s"
            results.append((ok, time.time() - t0, why))
            subprocess.run(["pkill", "-f", PROBE])
        good = sum(r[0] for r in results)
        print(f"{init:7s}: {good}/{a.tries} came back; " +
              ", ".join(f"{why} in {secs:.1f}s" for _, secs, why in results), flush=True)


if __name__ == "__main__":
    main()
