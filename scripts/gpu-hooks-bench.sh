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
      if ! python3 -c 'import ftcomm' 2>/dev/null; then
        python3 -m pip install -q --no-index --find-links .gpu-deps/wheels scikit-build-core pytest &&
          python3 -m pip install -q --no-build-isolation . >"$results/pip.log" 2>&1 ||
          { tail -30 "$results/pip.log"; exit 1; }
      fi
      cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFTCOMM_WITH_NCCL=ON -DTORCH_CUDA_ARCH_LIST=9.0 \
        >"$results/configure.log" 2>&1 || { tail -30 "$results/configure.log"; exit 1; }
      cmake --build "$build" --target ftcomm_bench_hooks 2>&1 | tail -2 || exit 1
      nproc; nvidia-smi -L; lscpu | grep -E "Model name|^CPU\(s\)"
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
