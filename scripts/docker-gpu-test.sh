#!/usr/bin/env bash
# The GPU test suite (scripts/gpu-test.sh) in the ftcomm image on a host with a
# Docker engine and the NVIDIA container toolkit: builds the image when missing
# (scripts/docker-test.sh --build-only), then runs docker/compose.yaml's gpu-tests
# service with every GPU. Exit status: the suite's; 2 when the host lacks what it
# needs (said plainly). Not run on the project's GPU machines: they have no
# container engine and cannot fetch images.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! docker info >/dev/null 2>&1; then
  echo "docker-gpu-test: no Docker engine answers (docker info failed); start dockerd, or run scripts/docker-test.sh" \
       "--build-only first (it installs and starts one)" >&2
  exit 2
fi
if ! command -v docker-compose >/dev/null; then
  echo "docker-gpu-test: docker-compose is missing; install Debian's docker-compose" >&2
  exit 2
fi
if ! docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia && ! command -v nvidia-ctk >/dev/null; then
  echo "docker-gpu-test: no NVIDIA container runtime; install the NVIDIA Container Toolkit and configure Docker for it" >&2
  exit 2
fi
image=${FTCOMM_IMAGE:-ftcomm:test}
docker image inspect "$image" >/dev/null 2>&1 || scripts/docker-test.sh --build-only || exit 3
FTCOMM_IMAGE=$image docker-compose -f docker/compose.yaml run --rm gpu-tests
