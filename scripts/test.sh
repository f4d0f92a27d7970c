#!/usr/bin/env bash
# The test command: installs what is missing (idempotent; the Python package
# included), configures, builds and runs every test: ctest, then pytest on the
# Python package. CI (.ci/run) calls this.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -R Broadcast    # extra arguments go to ctest (pytest still runs)
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
status=0
ctest --test-dir "$build" --output-on-failure --timeout 900 -j "${CTEST_PARALLEL:-2}" "$@" || status=$?
echo "test: running pytest tests/python (the Python package under torchrun)"
"${PYTHON:-python3}" -m pytest -q tests/python || status=$?
exit $status
