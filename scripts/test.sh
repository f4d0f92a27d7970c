#!/usr/bin/env bash
# The test command: installs what is missing (idempotent; the Python package
# included), configures, builds and runs every test: ctest and pytest on the
# Python package, side by side (pytest's output follows ctest's). CI (.ci/run)
# calls this.
#
#   scripts/test.sh                 # everything (15-22 minutes on 2 cores)
#   scripts/test.sh --fast          # the unit and cli tiers and the fast pytests (a few minutes)
#   scripts/test.sh -L e2e          # one ctest tier: unit, forked, cli, e2e, bench, install (pytest skipped)
#   scripts/test.sh -R Broadcast    # ctest entries matching the regex, and pytests whose name contains it
#
# Environment: BUILD_DIR (default build), BUILD_TYPE (Release), FTCOMM_SANITIZE (address|undefined|thread),
# CTEST_PARALLEL (default 2), PYTEST_WORKERS (pytest processes, default 1),
# FTCOMM_E2E_SEED (the e2e kill points: fixed unless set; "random" draws one).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}
fast=0 label="" regex=""
ctest_args=()
while (($#)); do
  case "$1" in
    --fast) fast=1 ;;
    -L) label=$2; ctest_args+=(-L "$2"); shift ;;
    -R) regex=$2; ctest_args+=(-R "$2"); shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) ctest_args+=("$1") ;;
  esac
  shift
done
t0=$SECONDS
phase() { printf 'test: [%s] %s\n' "$(date -u -d "@$((SECONDS - t0))" +%M:%S)" "$*"; }

phase "setup"
source scripts/ccache-env.sh
scripts/setup.sh

pytest_args=(-q tests/python -p no:cacheprovider)
if ((fast)); then
  ctest_args+=(-L 'unit|cli')
  pytest_args+=(-m fast)
fi
# pytest's -k takes words and "or", not a regex: A|B becomes "A or B".
[ -n "$regex" ] && pytest_args+=(-k "${regex//|/ or }")
workers=${PYTEST_WORKERS:-1}
((workers > 1)) && pytest_args+=(-n "$workers")
run_pytest=1
[ -n "$label" ] && run_pytest=0  # a ctest tier asked for

pytest_pid=""
cleanup() { [ -n "$pytest_pid" ] && kill -- "-$pytest_pid" 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$build"
pytest_log="$build/pytest.log"
if ((run_pytest)); then
  # pytest needs only the installed package (scripts/setup.sh), not this build: it
  # starts now and runs beside the build and ctest.
  phase "starting pytest tests/python in the background (the Python package under torchrun; log: $pytest_log)"
  set -m  # its own process group, so an interrupt stops every torchrun it started
  ( status=0; "${PYTHON:-python3}" -m pytest "${pytest_args[@]}" >"$pytest_log" 2>&1 || status=$?
    exit $status ) &
  pytest_pid=$!
  set +m
fi
phase "configuring $build"
# Release, as the Python package's build: the library's files then compile alike in
# both and the second build takes them from ccache (scripts/setup.sh sets its base dir).
cmake -S . -B "$build" -G Ninja -DFTCOMM_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" \
  ${FTCOMM_SANITIZE:+-DFTCOMM_SANITIZE=$FTCOMM_SANITIZE} >/dev/null
phase "building (first build takes a few minutes: libtorch headers are heavy)"
# Niced while pytest runs beside it: its torchrun jobs keep their pace, and the
# build takes what they leave of the cores.
${pytest_pid:+nice -n 10} cmake --build "$build"

phase "running ctest ${ctest_args[*]}"
status=0
ctest --test-dir "$build" --output-on-failure --timeout 900 -j "${CTEST_PARALLEL:-2}" "${ctest_args[@]}" || status=$?
phase "ctest finished (exit $status)"
if ((run_pytest)); then
  pytest_status=0
  wait "$pytest_pid" || pytest_status=$?
  pytest_pid=""
  cat "$pytest_log"
  # 5: no test matched -R/-m (nothing to run is not a failure of a narrowed run).
  if ((pytest_status == 5)) && { [ -n "$regex" ] || ((fast)); }; then pytest_status=0; fi
  phase "pytest finished (exit $pytest_status)"
  ((pytest_status == 0)) || status=$pytest_status
fi
phase "done (exit $status)"
exit $status
