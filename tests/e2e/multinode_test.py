"""End-to-end: whole nodes lost, under several torchrun agents on one host.

Each "node" is one torchrun agent with its own workers, its own checkpoint
directory (its disk) and, where this host lets us (root, `ip netns`), its own
network namespace with its own address, linked to the others by veth pairs on a
bridge in a namespace of its own. The rendezvous store (c10d backend) runs in a
namespace of its own too, standing in for an endpoint that outlives any node
(etcd, or a node that is not lost). Traffic goes only to those addresses or to
loopback. Where namespaces cannot be made, every node runs on loopback with its
own ports.

Cases (every run has a deadline; every process and namespace made is removed):
  * replacement (allreduce, and powersgd): 2 nodes x 2 ranks. Node 0 (ranks 0-1, and the workers' store)
    is SIGKILLed whole; a replacement node with an empty disk and a new address
    joins. The rendezvous numbers the nodes anew, so the survivor's workers take
    over the stores they hold (rank_store_dir); the replacement is resynced from
    peers; the run ends bit-identical to an uninterrupted one, losing <= 1 step
    (powersgd: back to the periodic commit whose buddy copies, one node over,
    hold the lost ranks' error feedback).
  * shrink and grow: nodes of 2, 1 and 1 ranks under --nnodes=2:3 (world 4). The
    third node is SIGKILLed: the job goes on at world 3 from the just-in-time
    step; then the node comes back with its old disk and the job grows to 4
    again. The final digest equals a single-host chain of runs stopped and
    resumed at the same steps and world sizes (determinism across a resize).

    python3 tests/e2e/multinode_test.py --ftcomm build/ftcomm [-k SUBSTRING] [--bench N]

(FTCOMM_MULTINODE_LOOPBACK=1 runs the nodes on loopback even where namespaces work.)

--bench N repeats both failures N times and prints where the time goes (node
death -> new workers launched -> group formed -> agreement, load, resync ->
first step) and the resync against a raw broadcast of the same bytes.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from e2e_common import free_port, read_events
import uuid

DEADLINE = 300  # seconds per case
STEPS = 60
ELASTIC_STEPS = 300
PACE_MS = 40  # steps of at least 40 ms: the returning node joins well before the end
GLOBAL_BATCH = 96


def log(*args):
    print(*args, flush=True)


def run(cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def descendants(pid):
    """pid and every process below it (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_all(pids):
    """SIGKILL all at once: stopped first, so none reacts to another's death."""
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass


class Network:
    """Node addresses: network namespaces on a bridge, else loopback."""

    def __init__(self, slots):
        self.tag = uuid.uuid4().hex[:5]
        self.namespaces, self.links = [], []
        self.netns = False
        if os.environ.get("FTCOMM_MULTINODE_LOOPBACK"):
            log("multinode: FTCOMM_MULTINODE_LOOPBACK set: every node on loopback")
        elif os.geteuid() == 0 and shutil.which("ip"):
            try:
                self._build(slots)
                self.netns = True
            except (subprocess.CalledProcessError, OSError) as e:
                log(f"multinode: network namespaces unavailable ({str(e).strip()[:200]}); using loopback")
                self.close()
        else:
            log("multinode: not root or no `ip`: every node on loopback")
        self.ifname = "eth0" if self.netns else "lo"

    def ns(self, slot):
        return f"ftc{self.tag}n{slot}"

    def _build(self, slots):
        # Private addresses that the host never routes: they live only inside
        # these namespaces.
        self.subnet = f"10.{200 + int(self.tag[:2], 16) % 50}.{int(self.tag[2:4], 16)}"
        switch = f"ftc{self.tag}sw"
        run(["ip", "netns", "add", switch])
        self.namespaces.append(switch)
        run(["ip", "-n", switch, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", switch, "link", "set", "br0", "up"])
        for slot in list(range(slots)) + ["r"]:
            ns = self.ns(slot)
            run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
            a, b = f"v{self.tag}{slot}a", f"v{self.tag}{slot}b"
            run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
            self.links.append(a)
            run(["ip", "link", "set", a, "netns", switch])
            run(["ip", "-n", switch, "link", "set", a, "master", "br0", "up"])
            run(["ip", "link", "set", b, "netns", ns])
            run(["ip", "-n", ns, "link", "set", b, "name", "eth0"])
            run(["ip", "-n", ns, "addr", "add", f"{self.addr(slot)}/24", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def addr(self, slot):
        if not getattr(self, "subnet", None) or not self.namespaces:
            return "127.0.0.1"
        return f"{self.subnet}.{100 if slot == 'r' else 1 + slot}"

    def prefix(self, slot):
        return ["ip", "netns", "exec", self.ns(slot)] if self.netns else []

    def pids(self, slot):
        """Every process in a node's namespace (netns mode)."""
        out = run(["ip", "netns", "pids", self.ns(slot)], check=False).stdout.split()
        return [int(p) for p in out]

    def close(self):
        for ns in self.namespaces:
            if ns != f"ftc{self.tag}sw":
                kill_all([int(p) for p in run(["ip", "netns", "pids", ns], check=False).stdout.split()])
        for ns in reversed(self.namespaces):
            run(["ip", "netns", "del", ns], check=False)
        self.namespaces = []


class Cluster:
    """A rendezvous store and torchrun agents ("nodes") that join it."""

    def __init__(self, ftcomm, workdir, slots, name):
        self.ftcomm, self.workdir, self.name = ftcomm, os.path.join(workdir, name), name
        os.makedirs(self.workdir)
        self.net = Network(slots)
        self.port = 29400 if self.net.netns else free_port()
        self.nodes = {}  # slot -> (Popen, log file)
        self.events = os.path.join(self.workdir, "events.jsonl")
        self.summary = os.path.join(self.workdir, "summary.json")
        code = ("import datetime, sys, time, torch.distributed as d\n"
                f"s = d.TCPStore('{self.net.addr('r')}', {self.port}, is_master=True, wait_for_workers=False, "
                "timeout=datetime.timedelta(seconds=600))\nprint('ready', flush=True)\ntime.sleep(1e9)\n")
        self.store = subprocess.Popen(self.net.prefix("r") + [sys.executable, "-c", code], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True)
        seen, deadline = [], time.time() + 60
        while time.time() < deadline:
            line = self.store.stdout.readline()
            seen.append(line)
            if "ready" in line or not line:
                break
        if "ready" not in seen[-1]:
            kill_all(descendants(self.store.pid))
            self.net.close()
            raise AssertionError("the rendezvous store did not start: " + "".join(seen)[-2000:])

    def disk(self, slot):
        return os.path.join(self.workdir, f"node{slot}-disk")

    def start(self, slot, nproc, nnodes, train_args, disk=None):
        rdzv_conf = "is_host=false,join_timeout=120,last_call_timeout=3,close_timeout=10," \
                    "keep_alive_interval=1,keep_alive_max_attempt=3"
        cmd = self.net.prefix(slot) + [
            sys.executable, "-m", "torch.distributed.run", "--no-python", f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.net.addr('r')}:{self.port}",
            f"--rdzv-id={self.name}", f"--rdzv-conf={rdzv_conf}", f"--local-addr={self.net.addr(slot)}",
            "--max-restarts=6", "--monitor-interval=0.2",
            self.ftcomm, "train", "--ckpt", disk or self.disk(slot), "--events", self.events,
            "--summary-json", self.summary, "--log-every", "20"] + train_args
        # torch 2.11: an agent that becomes rank 0 in a later round has no shared
        # store and fails an assertion (pytorch/pytorch#182221); without sharing,
        # each round's rank-0 worker serves the store.
        env = dict(os.environ, TORCH_FR_BUFFER_SIZE="0", PYTHONWARNINGS="ignore", GLOO_SOCKET_IFNAME=self.net.ifname,
                   TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
        out = open(os.path.join(self.workdir, f"node{slot}.log"), "a")
        self.nodes[slot] = (subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True), out)

    def kill(self, slot):
        """The whole node at once: agent and workers (and, in its namespace, all)."""
        proc, out = self.nodes.pop(slot)
        pids = set(descendants(proc.pid))
        if self.net.netns:
            pids |= set(self.net.pids(slot))
        kill_all(sorted(pids))
        proc.wait()
        out.close()
        return time.time()

    def wait_step(self, step, deadline, after_ms=0):
        while time.time() < deadline:
            if any(e["event"] == "step" and e["step"] >= step and e["unix_ms"] >= after_ms for e in read_events(self.events)):
                return
            self.check_alive()
            time.sleep(0.1)
        raise AssertionError(f"no step {step} before the deadline\n{self.tail()}")

    def wait_recovery(self, after_ms, deadline):
        """Rank 0's first recovery event after `after_ms`, once a step followed it."""
        while time.time() < deadline:
            events = read_events(self.events)
            rec = [e for e in events if e["event"] == "recovery" and e["unix_ms"] >= after_ms]
            if rec and any(e["event"] == "step" and e["unix_ms"] >= rec[0]["unix_ms"] for e in events):
                return rec[0]
            self.check_alive()
            time.sleep(0.1)
        raise AssertionError(f"no recovery before the deadline\n{self.tail()}")

    def check_alive(self):
        for slot, (proc, _) in self.nodes.items():
            if proc.poll() is not None and proc.returncode != 0:
                raise AssertionError(f"node {slot} exited {proc.returncode}\n{self.tail()}")

    def wait_done(self, deadline):
        for slot, (proc, out) in list(self.nodes.items()):
            try:
                proc.wait(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"node {slot} passed the deadline\n{self.tail()}")
            out.close()
            if proc.returncode != 0:
                raise AssertionError(f"node {slot} exited {proc.returncode}\n{self.tail()}")
        self.nodes = {}
        with open(self.summary) as f:
            return json.load(f)

    def tail(self):
        text = ""
        for name in sorted(os.listdir(self.workdir)):
            if name.endswith(".log"):
                with open(os.path.join(self.workdir, name)) as f:
                    text += f"--- {name}\n" + "".join(f.readlines()[-25:])
        return text

    def close(self):
        for slot in list(self.nodes):
            self.kill(slot)
        kill_all(descendants(self.store.pid))
        self.store.wait()
        self.net.close()


def common_args(hook="allreduce", steps=STEPS):
    return ["--steps", str(steps), "--hook", hook, "--global-batch", str(GLOBAL_BATCH), "--commit-every", "10",
            "--timeout", "30"]


def recoveries(events):
    """Rank 0's recovery events, one per attempt, in order."""
    return [e for e in events if e["event"] == "recovery"]


def phases(events, killed_at):
    """Where the time went from a node's death to the next first step."""
    after = [e for e in events if e["unix_ms"] >= killed_at * 1000]
    launched = [e for e in after if e["event"] == "launched"]
    start = [e for e in after if e["event"] == "start" and e["rank"] == 0]
    rec = [e for e in after if e["event"] == "recovery"]
    # The first step of the recovered job (a job still running, as before a grow, steps on meanwhile).
    steps = [e for e in after if e["event"] == "step" and rec and e["unix_ms"] >= rec[0]["unix_ms"]]
    if not (launched and start and rec and steps):
        return None
    t0 = killed_at * 1000
    first_launch = min(e["unix_ms"] for e in launched if e["attempt"] == start[0]["attempt"])
    p = rec[0]
    return {"to_launch_ms": first_launch - t0, "group_ms": start[0]["group_ms"], "agreement_ms": p["agreement_ms"],
            "load_ms": p["load_ms"], "resync_ms": p["resync_ms"], "resync_bytes": rec[0]["resync_bytes"],
            "to_first_step_ms": steps[0]["unix_ms"] - t0}


class SingleHost:
    """Reference runs: one torchrun on loopback, stopped and resumed as told."""

    def __init__(self, ftcomm, workdir, prefix=()):
        # prefix: what runs the command (containers: docker run ... IMAGE).
        self.ftcomm, self.workdir, self.count, self.prefix = ftcomm, workdir, 0, list(prefix)

    def chain(self, stages, hook="allreduce", steps=STEPS):
        """stages: [(world, stop_step), ...]; each resumes the previous one's store."""
        self.count += 1
        ckpt = os.path.join(self.workdir, f"single{self.count}")
        summary = os.path.join(self.workdir, f"single{self.count}.json")
        for world, stop in stages:
            args = common_args(hook, stop)
            if hook == "powersgd":
                args += ["--hook-arg", "start_iter=5", "--hook-arg", "rank=2"]
            args[args.index("--commit-every") + 1] = "1"  # a commit at every stop step
            cmd = self.prefix + [
                   "python3" if self.prefix else sys.executable, "-m", "torch.distributed.run", "--no-python",
                   f"--nproc-per-node={world}",
                   f"--master-port={free_port()}", self.ftcomm, "train", "--ckpt", ckpt, "--summary-json", summary,
                   "--log-every", "0"] + args
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE,
                                  env=dict(os.environ, TORCH_FR_BUFFER_SIZE="0", PYTHONWARNINGS="ignore"))
            assert proc.returncode == 0, f"reference stage {world}:{stop} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        with open(summary) as f:
            return json.load(f)["param_digest"]


def replacement(ftcomm, workdir, single, measure=None, hook="allreduce", cluster=Cluster):
    """With powersgd the lost ranks' error feedback comes from buddy copies one
    node over, which periodic commits carry: the job goes back to step 20.
    `cluster` makes the nodes (tests/e2e/container_nodes_test.py: containers)."""
    c = cluster(ftcomm, workdir, 3, f"replace-{uuid.uuid4().hex[:4]}")
    args = common_args(hook) + (["--hook-arg", "start_iter=5", "--hook-arg", "rank=2"] if hook == "powersgd" else [])
    try:
        deadline = time.time() + DEADLINE
        for slot in (0, 1):
            c.start(slot, 2, "2", args)
        c.wait_step(25, deadline)
        killed_at = c.kill(0)  # ranks 0-1, and the workers' store with them
        time.sleep(1)
        c.start(2, 2, "2", args)  # a new node: another address, an empty disk
        r = c.wait_done(deadline)
        events = read_events(c.events)
        rec = recoveries(events)
        assert r["world_size"] == 4 and r["resumed_world_size"] == 4, r
        # The new node's two ranks, and a survivor whose last allreduce the kill cut
        # short while its peer's had completed (it resumes from that peer's step).
        assert r["resync_bytes"] > 0 and len(r["resynced_ranks"]) >= 2, r
        if hook == "powersgd":
            assert r["resumed_from_step"] == 20 and r["local_state_reset"] == [], r
            assert "buddy copy" in r["local_state"], r["local_state"]
        else:
            assert r["steps_lost"] <= 1, r
        want = single.chain([(4, STEPS)], hook=hook)
        assert r["param_digest"] == want, f"digest {r['param_digest'][:16]} != uninterrupted {want[:16]}"
        took_over = [n for n in os.listdir(c.disk(1)) if n.startswith("rank")]
        log(f"  resumed from step {r['resumed_from_step']} (just in time: {r['resumed_just_in_time']}), "
            f"resynced ranks {r['resynced_ranks']} ({r['resync_bytes']} bytes), node 1's disk now holds {took_over}")
        p = phases(events, killed_at)
        if measure is not None and p:
            measure.append(p)
        assert len(rec) >= 1
    finally:
        c.close()


def shrink_and_grow(ftcomm, workdir, single, measure=None, cluster=Cluster):
    c = cluster(ftcomm, workdir, 3, f"elastic-{uuid.uuid4().hex[:4]}")
    try:
        deadline = time.time() + DEADLINE
        for slot, nproc in ((0, 2), (1, 1), (2, 1)):
            c.start(slot, nproc, "2:3", common_args(steps=ELASTIC_STEPS) + ["--pace-ms", str(PACE_MS)])
        # Mid-way between periodic commits (every 10): killed at step 20 or just
        # after it, the newest step can be the periodic commit itself, and then
        # there is nothing to save just in time (seen once under load).
        c.wait_step(25, deadline)
        killed_at = c.kill(2)  # rank 3's node: no replacement comes
        rec = c.wait_recovery(killed_at * 1000, deadline)
        events = read_events(c.events)
        assert rec["world_size"] == 3 and rec["resumed_world_size"] == 4, rec
        assert rec["steps_lost"] <= 1 and rec["resumed_just_in_time"], rec
        shrunk_at = rec["resumed_from_step"]
        shrink = phases(events, killed_at)
        # Let it train a while at world 3, then the node comes back with its old disk.
        c.wait_step(shrunk_at + 8, deadline)
        back_at = time.time()
        c.start(2, 1, "2:3", common_args(steps=ELASTIC_STEPS) + ["--pace-ms", str(PACE_MS)])
        r = c.wait_done(deadline)
        rec = recoveries(read_events(c.events))
        worlds = [(e["world_size"], e["resumed_from_step"], e["resumed_world_size"]) for e in rec]
        grown_at = rec[-1]["resumed_from_step"]
        assert rec[-1]["world_size"] == 4 and rec[-1]["resumed_world_size"] == 3, worlds
        assert r["world_size"] == 4, r
        log(f"  recoveries (world, from step, written at world): {worlds}")
        want = single.chain([(4, shrunk_at), (3, grown_at), (4, ELASTIC_STEPS)])
        assert r["param_digest"] == want, (f"digest {r['param_digest'][:16]} != the single-host chain 4->{shrunk_at}, "
                                           f"3->{grown_at}, 4->{ELASTIC_STEPS}: {want[:16]}")
        if measure is not None and shrink:
            grow = phases(read_events(c.events), back_at)
            measure.append((shrink, grow))
    finally:
        c.close()


def raw_broadcast(workdir, nbytes, repeats=20):
    """One gloo broadcast of `nbytes` between two namespaced nodes (ms, median)."""
    net = Network(2)
    try:
        port = 29500 if net.netns else free_port()
        code = ("import os, sys, time, torch, torch.distributed as d\n"
                f"d.init_process_group('gloo', init_method='tcp://{net.addr(0)}:{port}', rank=int(sys.argv[1]), "
                "world_size=2)\n"
                f"t = torch.zeros({nbytes} // 4)\nts = []\n"
                f"for _ in range({repeats}):\n    d.barrier(); s = time.perf_counter(); d.broadcast(t, 0); "
                "ts.append(time.perf_counter() - s)\n"
                "ts.sort()\nprint(1000 * ts[len(ts) // 2], flush=True)\n")
        env = dict(os.environ, GLOO_SOCKET_IFNAME=net.ifname)
        procs = [subprocess.Popen(net.prefix(i) + [sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=env) for i in (0, 1)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        return float(outs[1].strip().splitlines()[-1])
    finally:
        net.close()


def main():
    # A deadline's SIGTERM (ctest, timeout) still removes what was made.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("multinode: terminated"))
    parser = argparse.ArgumentParser()
    parser.add_argument("--ftcomm", required=True)
    parser.add_argument("-k", default="", help="run the cases whose name contains this")
    parser.add_argument("--case", help="run only the case of exactly this name")
    parser.add_argument("--bench", type=int, default=0, help="repeat each failure N times and print the phases")
    args = parser.parse_args()
    ftcomm = os.path.abspath(args.ftcomm)
    workdir = tempfile.mkdtemp(prefix="ftcomm-multinode-")
    single = SingleHost(ftcomm, workdir)
    failures = []
    try:
        if args.bench:
            bench(ftcomm, workdir, single, args.bench, args.k)
            return
        cases = (("replacement node", replacement),
                 ("replacement node, powersgd", lambda *a: replacement(*a, hook="powersgd")),
                 ("shrink and grow", shrink_and_grow))
        for name, fn in cases:
            if args.k not in name or (args.case and args.case != name):
                continue
            t = time.time()
            try:
                fn(ftcomm, workdir, single)
                log(f"PASS {name} ({time.time() - t:.1f}s)")
            except Exception as e:  # noqa: BLE001 - report every case
                failures.append(name)
                log(f"FAIL {name} ({time.time() - t:.1f}s): {e}")
    finally:
        if not os.environ.get("FTCOMM_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir}")
    if failures:
        sys.exit(f"{len(failures)} multi-node case(s) failed: {failures}")


def bench(ftcomm, workdir, single, repeats, only=""):
    replaced, elastic = [], []
    for _ in range(repeats):
        if only in "replacement node":
            replacement(ftcomm, workdir, single, replaced)
        if only in "shrink and grow":
            shrink_and_grow(ftcomm, workdir, single, elastic)
    rows = [("replacement node", replaced), ("no replacement (4 -> 3)", [s for s, _ in elastic]),
            ("node back (3 -> 4)", [g for _, g in elastic if g])]
    keys = ["to_launch_ms", "group_ms", "agreement_ms", "load_ms", "resync_ms", "to_first_step_ms", "resync_bytes"]
    print("| case | " + " | ".join(keys) + " |")
    print("|" + " --- |" * (len(keys) + 1))
    for name, ms in rows:
        if ms:
            print(f"| {name} (median of {len(ms)}) | " +
                  " | ".join(f"{statistics.median(m[k] for m in ms):.1f}" for k in keys) + " |")
    if replaced:
        nbytes = int(statistics.median(m["resync_bytes"] for m in replaced))
        raw = raw_broadcast(workdir, nbytes)
        resync = statistics.median(m["resync_ms"] for m in replaced)
        print(f"resync to the replacement: {nbytes} bytes in {resync:.2f} ms (median; the whole phase: manifest, "
              f"broadcast_coalesced, rank-local state, data position) vs one raw gloo broadcast of the same bytes "
              f"between two nodes: {raw:.2f} ms")


if __name__ == "__main__":
    main()
