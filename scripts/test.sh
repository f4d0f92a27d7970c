#!/usr/bin/env bash
# The test command: installs what is missing (idempotent), configures, builds and
# runs every test with ctest. CI (.ci/run) calls this.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -R Broadcast    # extra arguments go to ctest
#
# Environment: BUILD_DIR (default build), FTCOMM_SANITIZE (address|undefined|thread),
# CTEST_PARALLEL (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}
scripts/setup.sh
echo "test: configuring $build"
cmake -S . -B "$build" -G Ninja -DFTCOMM_BUILD_TESTS=ON ${FTCOMM_SANITIZE:+-DFTCOMM_SANITIZE=$FTCOMM_SANITIZE} >/dev/null
echo "test: building (first build takes a few minutes: libtorch headers are heavy)"
cmake --build "$build"
echo "test: running ctest"
ctest --test-dir "$build" --output-on-failure --timeout 900 -j "${CTEST_PARALLEL:-2}" "$@"
