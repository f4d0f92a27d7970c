#!/usr/bin/env bash
# Builds the ftcomm GPU image and runs, on a host with a Docker engine and the NVIDIA
# container runtime: (1) the GPU test suite in a container with every GPU; (2) a
# two-container torchrun job with one container killed mid-training, which must
# recover and finish. Says clearly what is missing when it cannot run.
set -uo pipefail
cd "$(dirname "$0")/.."
compose=(docker compose -f docker/compose.yaml)
if ! command -v docker >/dev/null; then
  echo "docker-gpu-test: no docker client on PATH; install Docker Engine (https://docs.docker.com/engine/install/)" >&2
  exit 2
fi
if ! docker info >/dev/null 2>&1; then
  echo "docker-gpu-test: no Docker engine answers (docker info failed); start dockerd or run on a host that has one" >&2
  exit 2
fi
if ! docker compose version >/dev/null 2>&1; then
  echo "docker-gpu-test: the docker compose plugin is missing; install docker-compose-plugin" >&2
  exit 2
fi
if ! docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia && ! command -v nvidia-ctk >/dev/null; then
  echo "docker-gpu-test: no NVIDIA container runtime; install the NVIDIA Container Toolkit and configure Docker for it" >&2
  exit 2
fi
set -e
"${compose[@]}" build gpu-tests
"${compose[@]}" run --rm gpu-tests
"${compose[@]}" up --abort-on-container-exit --exit-code-from node0 node0 node1 chaos
echo "docker-gpu-test: passed"
