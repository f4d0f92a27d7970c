#!/usr/bin/env bash
# Issue 25's checkpoint-speed runs on the lent GPU machine (one GPU), in stages that
# fit one device call each (10 minutes), results in $OUT (or build-gpu/results):
#
#   scripts/gpu-ckpt-bench.sh build      # the Python package, ftcomm_tests and ftcomm_bench_store (NCCL on)
#   scripts/gpu-ckpt-bench.sh store      # the store's gtests on CUDA state; ftcomm_bench_store (1 GB snapshot)
#   scripts/gpu-ckpt-bench.sh commit     # ft_commit_bench.py, world 1: the 151 MB model, K=1 and 10,
#                                        #   a writer capped below the step's pace, a 1000-step run
#   scripts/gpu-ckpt-bench.sh big        # ft_commit_bench.py on the 1208 MB model, K=1 and 10
#
# Carry .gpu-deps (scripts/prepare-gpu-deps.sh): the machine has no network.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-common.sh
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
scratch=${SCRATCH:-/tmp/ftcomm-ckpt-bench}
failed=0
commit_bench() {  # name, then ft_commit_bench.py's arguments
  local name=$1
  shift
  rm -rf "$scratch" && mkdir -p "$scratch"
  timeout 500 torchrun --nproc-per-node=1 --master-port=29741 tests/bench/ft_commit_bench.py --device cuda \
    --dir "$scratch" --json "$results/$name.json" "$@" >"$results/$name.txt" 2>&1 ||
    { echo "$name failed"; tail -20 "$results/$name.txt"; failed=$((failed + 1)); }
  sed -n '/^method/,$p' "$results/$name.txt"
}
for stage in "$@"; do
  echo "=== gpu-ckpt-bench: $stage ($(date +%T))"
  case $stage in
    build)
      gpu_build ftcomm_tests ftcomm_bench_store || exit 1
      df -h /tmp | tail -1
      ;;
    store)
      "$build/tests/ftcomm_tests" --gtest_filter='CheckpointStoreStaging.*:CheckpointStore.*' 2>&1 | tail -4 ||
        failed=$((failed + 1))
      "$build/tests/ftcomm_bench_store" --dir "$scratch" --snapshot-mb 1024 --repeats 5 --commits 50 2>&1 | tail -7
      ;;
    commit)
      commit_bench commit-151mb --steps 22 --every 1,10 --slow-disk-mb-s 1000 --memory-steps 1000
      ;;
    big)
      commit_bench commit-1208mb --widths 2048,4096,4096,4096,4096,4096,4096,2048 --batch 64 --steps 14 --every 1,10
      ;;
    *) echo "gpu-ckpt-bench: unknown stage '$stage' (build, store, commit, big)" >&2; exit 2 ;;
  esac
done
exit "$failed"
