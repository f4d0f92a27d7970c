"""Helpers for the Python package's tests: torchrun runs with a deadline."""
import json
import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TRAINER = os.path.join(HERE, "trainer.py")
DEADLINE = 240  # seconds for one torchrun, restarts included
# FTCOMM_TEST_DEVICE=cuda runs the trainer on GPUs (NCCL, CUDA RNG); runs that need
# more ranks than GPUs are skipped.
DEVICE = os.environ.get("FTCOMM_TEST_DEVICE", "cpu")


def gpus():
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class Run:
    def __init__(self, returncode, output, result):
        self.returncode = returncode
        self.output = output
        self.result = result


def torchrun(script, args, nproc=2, max_restarts=0, deadline=DEADLINE, env=None):
    """Runs `script` under torchrun (its own rendezvous port) and returns its
    exit code, its output, and the JSON file named by --out when there is one."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.2", script] + [str(a) for a in args]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    full_env.update(env or {})
    start = time.time()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=deadline,
                              env=full_env, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"torchrun passed its {deadline}s deadline:\n{out[-4000:]}")
    result = None
    if "--out" in args:
        path = str(args[args.index("--out") + 1])
        if os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
    run = Run(proc.returncode, proc.stdout, result)
    run.seconds = time.time() - start
    return run


def train(tmp_path, name, nproc=2, max_restarts=0, **kw):
    """The trainer under torchrun, its store under tmp_path/name; kw become flags."""
    if DEVICE == "cuda" and nproc > gpus():
        pytest.skip(f"{nproc} ranks need {nproc} GPUs, this host has {gpus()}")
    args = ["--ckpt", tmp_path / f"{name}-ckpt", "--out", tmp_path / f"{name}.json", "--device", DEVICE]
    for k, v in kw.items():
        if isinstance(v, (list, tuple)):
            for item in v:
                args += ["--" + k.replace("_", "-"), item]
        else:
            args += ["--" + k.replace("_", "-"), v]
    return torchrun(TRAINER, args, nproc=nproc, max_restarts=max_restarts)


def ok(run):
    assert run.returncode == 0, run.output[-6000:]
    assert run.result is not None, run.output[-6000:]
    return run.result
