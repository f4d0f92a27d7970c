#!/usr/bin/env bash
# The ftcomm demo (the README's first command): sets up what is missing, builds, then
# runs 4 ranks of `ftcomm train` under torchrun (CPU, Gloo, stores in a temp dir) with
# the powersgd hook, kills a rank mid-training, recovers, repeats the run without a
# failure, and prints the table; writes demo-loss.png (loss curves, failure marked).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
python3 -c 'import matplotlib' 2>/dev/null || { echo "demo: installing matplotlib (for the picture)"; python3 -m pip install -q matplotlib; }
if [ ! -x build/ftcomm ] || [ -n "$(find src include hooks_ts CMakeLists.txt -newer build/ftcomm -print -quit)" ]; then
  echo "demo: building (first build takes a few minutes)"
  cmake -S . -B build -G Ninja >/dev/null
  cmake --build build --target ftcomm_cli
fi
exec python3 scripts/demo.py --ftcomm build/ftcomm --out "${DEMO_OUT:-.}" "$@"
