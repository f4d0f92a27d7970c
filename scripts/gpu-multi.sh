#!/usr/bin/env bash
# The multi-GPU run (several GPUs of one host, NCCL at world size = GPU count):
#   1. the full test suite;  2. broadcast_coalesced benchmark over NCCL;
#   3. hook step times;  4. recovery under torchrun (kill a rank, resume, compare the
#   final digest with an uninterrupted run);  5. a forced NCCL init failure falls
#   back to Gloo. QUICK=1 runs only 2, 4 and 5 (for a short lease).
# Results go to $RESULTS (default $OUT or build-gpu/results).
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .gpu-deps/env.sh ] && source .gpu-deps/env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
results=${RESULTS:-${OUT:-build-gpu/results}}
mkdir -p "$results"
gpus=$(nvidia-smi -L | wc -l)
nvidia-smi -L | tee "$results/gpus.txt"
cmake -S . -B build-gpu -G Ninja -DFTCOMM_WITH_NCCL=ON -DTORCH_CUDA_ARCH_LIST=9.0 >/dev/null
if [ "${QUICK:-0}" = 1 ]; then
  cmake --build build-gpu --target ftcomm_cli ftcomm_bench_broadcast | tail -1
else
  cmake --build build-gpu | tail -1
  ctest --test-dir build-gpu --output-on-failure -j 8 2>&1 | tee "$results/ctest.log" | tail -5
  torchrun --no-python --nproc-per-node="$gpus" --master-port=29741 build-gpu/tests/ftcomm_bench_hooks --device cuda 2>&1 \
    | tee "$results/hooks.txt" | tail -12 || true
fi
echo "=== recovery under torchrun, NCCL, world $gpus"
w=$(mktemp -d)
a=(train --device cuda --backend nccl --model charlm --steps 40 --hook powersgd --hook-arg start_iter=5 --log-every 20)
torchrun --no-python --nproc-per-node="$gpus" --master-port=29742 build-gpu/ftcomm "${a[@]}" --ckpt "$w/a" \
  --summary-json "$w/a.json" 2>&1 | grep -E "process group|done" | tee "$results/recovery.txt"
torchrun --no-python --nproc-per-node="$gpus" --max-restarts=1 --master-port=29743 build-gpu/ftcomm "${a[@]}" --ckpt "$w/b" \
  --summary-json "$w/b.json" --fail-at "$((gpus - 1)):23:hook" 2>&1 | grep -E "resumed|done" | tee -a "$results/recovery.txt"
python3 -c "import json; a=json.load(open('$w/a.json')); b=json.load(open('$w/b.json')); print('digest equal', a['param_digest']==b['param_digest'])" \
  | tee -a "$results/recovery.txt"
echo "=== broadcast_coalesced over NCCL, world $gpus"
torchrun --no-python --nproc-per-node="$gpus" --master-port=29744 build-gpu/tests/ftcomm_bench_broadcast --device cuda \
  --backend nccl --iters 5 --json "$results/bench-broadcast-nccl.json" 2>&1 | tee "$results/bench-broadcast-nccl.txt" | tail -18
echo "=== forced NCCL init failure"
NCCL_NET=ftcomm-no-such-net torchrun --no-python --nproc-per-node="$gpus" --master-port=29745 build-gpu/ftcomm doctor \
  2>&1 | grep -E "process group|doctor" | tee "$results/fallback.txt"
