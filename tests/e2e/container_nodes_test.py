"""End-to-end: whole nodes lost, with containers as nodes (docker/nodes.yaml).

The cases of tests/e2e/multinode_test.py, where each node is a container of the
ftcomm image on a compose network: its own network stack and hostname, its own
disk (a host directory mounted at /disk; a new node's is empty), one torchrun
agent and its workers. The rendezvous store runs in a container of its own. A lost
node is `docker kill` of its container (every process in it at once).

  * replacement node: node 0 (2 ranks) killed, node 2 with an empty disk joins;
    the run ends bit-identical to an uninterrupted one with at most one step lost.
  * shrink and grow: nodes of 2, 1 and 1 ranks under --nnodes=2:3; node 2 is
    killed (the job goes on at world 3 from the just-in-time step), then comes
    back with its old disk (world 4 again); the digest equals a single-host chain.

The reference runs are containers of the same image. Needs the image and
docker-compose; scripts/docker-test.sh --nodes builds the image and runs this.

    python3 tests/e2e/container_nodes_test.py [--image ftcomm:test] [-k SUBSTRING]
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multinode_test as mn  # noqa: E402

COMPOSE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docker", "nodes.yaml")
FTCOMM_IN_IMAGE = "/ftcomm/build/ftcomm"


def docker(*args, check=True, timeout=120):
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


class ContainerCluster:
    """multinode_test.Cluster's interface over docker-compose: slots are node services."""

    image = "ftcomm:test"

    def __init__(self, ftcomm, workdir, slots, name):
        self.name = name.replace("-", "")
        self.workdir = os.path.join(workdir, name)
        os.makedirs(os.path.join(self.workdir, "shared"))
        self.events = os.path.join(self.workdir, "shared", "events.jsonl")
        self.summary = os.path.join(self.workdir, "shared", "summary.json")
        self.env = dict(os.environ, FTCOMM_IMAGE=self.image, FTCOMM_NODES_DIR=self.workdir, FTCOMM_RUN_ID=self.name)
        self.nodes = set()
        self.compose("up", "-d", "rdzv")
        deadline = time.time() + 60
        while "ready" not in docker("logs", self.container("rdzv"), check=False).stdout:
            if time.time() > deadline:
                raise AssertionError("the rendezvous container did not start:\n" + self.tail())
            time.sleep(0.5)

    def compose(self, *args, env=None, timeout=300):
        proc = subprocess.run(["docker-compose", "-p", self.name, "-f", COMPOSE, *args], capture_output=True,
                              text=True, env=env or self.env, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed: {proc.stderr[-2000:]}")
        return proc

    def container(self, service):
        return f"{self.name}_{service}_1"

    def disk(self, slot):
        return os.path.join(self.workdir, f"node{slot}-disk")

    def start(self, slot, nproc, nnodes, train_args, disk=None):
        assert disk is None, "a node's disk is its own directory"
        os.makedirs(self.disk(slot), exist_ok=True)
        env = dict(self.env, FTCOMM_NNODES=str(nnodes), FTCOMM_TRAIN_ARGS=" ".join(train_args),
                   **{f"FTCOMM_NPROC_{slot}": str(nproc)})
        # A service that ran before (a node coming back) is started anew, same disk.
        self.compose("up", "-d", "--no-deps", "--force-recreate", f"node{slot}", env=env)
        self.nodes.add(slot)

    def kill(self, slot):
        docker("kill", self.container(f"node{slot}"))
        self.nodes.discard(slot)
        return time.time()

    def state(self, slot):
        out = docker("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", self.container(f"node{slot}"),
                     check=False).stdout.split()
        return (out[0], int(out[1])) if len(out) == 2 else ("gone", -1)

    def check_alive(self):
        for slot in self.nodes:
            status, code = self.state(slot)
            if status == "exited" and code != 0:
                raise AssertionError(f"node {slot} exited {code}\n{self.tail()}")

    wait_step = mn.Cluster.wait_step
    wait_recovery = mn.Cluster.wait_recovery

    def wait_done(self, deadline):
        for slot in sorted(self.nodes):
            left = max(1, deadline - time.time())
            try:
                code = int(docker("wait", self.container(f"node{slot}"), timeout=left).stdout.strip() or -1)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"node {slot} passed the deadline\n{self.tail()}")
            if code != 0:
                raise AssertionError(f"node {slot} exited {code}\n{self.tail()}")
        self.nodes = set()
        with open(self.summary) as f:
            return json.load(f)

    def tail(self):
        text = ""
        for service in ["rdzv", "node0", "node1", "node2"]:
            out = docker("logs", "--tail", "25", self.container(service), check=False)
            if out.returncode == 0:
                text += f"--- {service}\n{out.stdout}{out.stderr}"
        return text

    def close(self):
        subprocess.run(["docker-compose", "-p", self.name, "-f", COMPOSE, "down", "-v", "-t", "2"],
                       capture_output=True, env=self.env, timeout=120)


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("container nodes: terminated"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="ftcomm:test")
    parser.add_argument("--workdir", default="", help="host directory for the nodes' disks (default: a new temp dir)")
    parser.add_argument("-k", default="", help="run the cases whose name contains this")
    args = parser.parse_args()
    for tool in ("docker", "docker-compose"):
        if not shutil.which(tool):
            sys.exit(f"container nodes: {tool} is missing (scripts/docker-test.sh --nodes installs it)")
    if docker("image", "inspect", args.image, check=False).returncode != 0:
        sys.exit(f"container nodes: no image {args.image}; build it: scripts/docker-test.sh --build-only")
    ContainerCluster.image = args.image
    workdir = args.workdir or tempfile.mkdtemp(prefix="ftcomm-nodes-")
    os.makedirs(workdir, exist_ok=True)
    workdir = os.path.abspath(workdir)
    # Reference runs: the same image, the work directory at the same path inside.
    single = mn.SingleHost(FTCOMM_IN_IMAGE, workdir, prefix=[
        "docker", "run", "--rm", "--init", "-v", f"{workdir}:{workdir}", "-e", "TORCH_FR_BUFFER_SIZE=0",
        "-e", "PYTHONWARNINGS=ignore", args.image])
    failures = []
    cases = (("replacement node", lambda: mn.replacement(FTCOMM_IN_IMAGE, workdir, single, cluster=ContainerCluster)),
             ("shrink and grow", lambda: mn.shrink_and_grow(FTCOMM_IN_IMAGE, workdir, single,
                                                            cluster=ContainerCluster)))
    try:
        for name, fn in cases:
            if args.k not in name:
                continue
            t = time.time()
            try:
                fn()
                mn.log(f"PASS {name} ({time.time() - t:.1f}s)")
            except Exception as e:  # noqa: BLE001 - report every case
                failures.append(name)
                mn.log(f"FAIL {name} ({time.time() - t:.1f}s): {e}")
    finally:
        if not os.environ.get("FTCOMM_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)
    if failures:
        sys.exit(f"{len(failures)} container-node case(s) failed: {failures}")


if __name__ == "__main__":
    main()
