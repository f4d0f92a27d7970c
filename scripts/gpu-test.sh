#!/usr/bin/env bash
# GPU test entry point: builds ftcomm with NCCL and runs, on one machine with one or
# more GPUs,
#   1. the whole ctest suite (the CUDA cases run: Gloo with CUDA tensors, NCCL at
#      world size 1; multi-process cases run on CPU as everywhere);
#   2. `ftcomm doctor` under torchrun with NCCL, at world size = GPU count;
#   3. the same with NCCL's initialisation forced to fail: the group must fall back
#      to Gloo and say so;
#   4. the broadcast benchmark with CUDA tensors.
# The Docker image (docker/Dockerfile) runs exactly this script.
#
# Environment: BUILD_DIR (default build-gpu), RESULTS (default $OUT or build-gpu/results),
# GPU_BENCH=0 to skip step 4. On the project's lent GPU machine, carry .gpu-deps
# (scripts/prepare-gpu-deps.sh) and this script sources it.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-common.sh
failed=()
step() { echo; echo "=== gpu-test: $*"; }

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-test: no NVIDIA GPU visible (nvidia-smi -L failed). Run this on a GPU host, or in the" >&2
  echo "          container with --gpus all (scripts/docker-gpu-test.sh)." >&2
  exit 2
fi
nvidia-smi -L | tee "$results/gpus.txt"
gpus=$(nvidia-smi -L | wc -l)

step "configure and build with NCCL"
cmake -S . -B "$build" -G Ninja -DFTCOMM_WITH_NCCL=ON -DTORCH_CUDA_ARCH_LIST=9.0 >"$results/configure.log" 2>&1 \
  || { tail -30 "$results/configure.log"; exit 1; }
grep 'ftcomm: NCCL backend' "$results/configure.log"
cmake --build "$build" 2>&1 | tail -3 || exit 1

step "ctest (all tests)"
ctest --test-dir "$build" --output-on-failure --timeout 900 -j 8 2>&1 | tee "$results/ctest.log" | grep -vE '^ +[0-9]+/[0-9]+ Test' | tail -25
grep -q '100% tests passed' "$results/ctest.log" || failed+=(ctest)
grep -E 'Broadcast\.(MixedCpuAndCudaOverGloo|NcclWorldOne)|NcclWithoutGpu' "$results/ctest.log"

step "ftcomm doctor, NCCL, world size $gpus under torchrun"
torchrun --no-python --nproc-per-node="$gpus" --master-port=29731 "$build/ftcomm" doctor --backend nccl 2>&1 \
  | tee "$results/doctor-nccl.log" || failed+=(doctor-nccl)

step "forced NCCL init failure: --backend auto must fall back to Gloo"
NCCL_NET=ftcomm-no-such-net NCCL_SOCKET_IFNAME=ftcomm-no-such-if \
  torchrun --no-python --nproc-per-node="$gpus" --master-port=29732 "$build/ftcomm" doctor --backend auto 2>&1 \
  | tee "$results/doctor-fallback.log"
grep -q 'cuda->gloo (NCCL not used' "$results/doctor-fallback.log" \
  && grep -q 'cuda:0: allreduce ok' "$results/doctor-fallback.log" || failed+=(fallback)

if [ "${GPU_BENCH:-1}" != 0 ]; then
  step "broadcast benchmark, CUDA tensors over Gloo, world 2 on GPU 0"
  "$build/tests/ftcomm_bench_broadcast" --world 2 --device cuda --backend gloo --iters 5 \
    --json "$results/bench-broadcast-cuda-gloo-w2.json" 2>&1 | tee "$results/bench-broadcast-cuda-gloo-w2.txt" | tail -20 \
    || failed+=(bench-gloo-cuda)
  if [ "$gpus" -lt 2 ]; then
    echo "gpu-test: NCCL broadcast benchmark skipped: it needs 2 or more GPUs (world size 1 moves no data)"
  else
  step "broadcast benchmark, NCCL, world $gpus"
  torchrun --no-python --nproc-per-node="$gpus" --master-port=29733 "$build/tests/ftcomm_bench_broadcast" \
    --device cuda --backend nccl --iters 5 --json "$results/bench-broadcast-nccl-w$gpus.json" 2>&1 \
    | tee "$results/bench-broadcast-nccl-w$gpus.txt" | tail -20 || failed+=(bench-nccl)
  fi
fi

if [ "${GPU_BENCH:-1}" != 0 ]; then
  step "PowerSGD per bucket on cuda:0: ftcomm's TorchScript hook vs PyTorch's Python powerSGD_hook"
  "$build/tests/ftcomm_bench_hooks" --bucket-timing cuda --backend nccl 2>&1 | tee "$results/powersgd-buckets.txt" | tail -1 \
    || failed+=(powersgd-ts)
  python3 -W ignore tests/bench/powersgd_python_bench.py cuda nccl 2>&1 | tee -a "$results/powersgd-buckets.txt" | tail -1 \
    || failed+=(powersgd-python)
fi

echo
if ((${#failed[@]})); then
  echo "gpu-test: FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu-test: all steps passed"
