#!/usr/bin/env bash
# Issue 29's hook-speed runs on the lent GPU machine (one GPU, a 16-core host), in
# stages so that each fits one device call (10 minutes):
#
#   scripts/gpu-hooks-bench.sh build        # the Python package and ftcomm_bench_hooks (NCCL on)
#   scripts/gpu-hooks-bench.sh gpu          # world 1 on the GPU, both models, Python DDP and the C++ trainer
#   scripts/gpu-hooks-bench.sh cpu          # the CPU matrix (scripts/bench-cpu-worlds.sh), GPU hidden
#
# Stages can be given together (build gpu). Results go to $OUT (or build-gpu/results).
# Carry .gpu-deps (scripts/prepare-gpu-deps.sh): the machine has no network.
# Environment for the cpu stage: as scripts/bench-cpu-worlds.sh (WORLDS, MODELS, REPEATS, PIN).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-common.sh
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
failed=0
for stage in "$@"; do
  echo "=== gpu-hooks-bench: $stage ($(date +%T))"
  case $stage in
    build)
      gpu_build ftcomm_bench_hooks || exit 1
      ;;
    gpu)
      for spec in "mlp 256" "deep 64"; do
        set -- $spec
        timeout 240 torchrun --nproc-per-node=1 --master-port=29731 tests/bench/python_hooks_bench.py --device cuda \
          --model "$1" --batch "$2" --rounds 7 --steps 5 --json "$results/gpu-py-$1.json" >"$results/gpu-py-$1.txt" 2>&1 ||
          { echo "python $1 failed"; tail -20 "$results/gpu-py-$1.txt"; failed=$((failed + 1)); }
        grep -E "^(Python DDP|ftcomm|pytorch|ddp|target|machinery)" "$results/gpu-py-$1.txt"
        timeout 240 torchrun --no-python --nproc-per-node=1 --master-port=29732 "$build/tests/ftcomm_bench_hooks" \
          --device cuda --model "$1" --batch "$2" --rounds 7 --steps 5 --json "$results/gpu-cpp-$1.json" \
          >"$results/gpu-cpp-$1.txt" 2>&1 || { echo "C++ $1 failed"; tail -20 "$results/gpu-cpp-$1.txt"; failed=$((failed + 1)); }
        grep -E "^(Reducer|ts |builtin|no hook|targets|correctness)" "$results/gpu-cpp-$1.txt"
      done
      ;;
    cpu)
      BUILD_DIR=$build RESULTS="$results/cpu" scripts/bench-cpu-worlds.sh || failed=$((failed + 1))
      ;;
    *) echo "gpu-hooks-bench: unknown stage '$stage' (build, gpu, cpu)" >&2; exit 2 ;;
  esac
done
exit "$failed"
