#!/usr/bin/env bash
# On a GPU machine: just-in-time commits with CUDA state, `ftcomm train --device cuda`
# under torchrun, each run against an uninterrupted one (final parameter digests):
#   - world = GPU count with NCCL when there are 2+ GPUs, else world 2 sharing GPU 0
#     (Gloo over CUDA tensors): a kill mid-hook with no periodic commits; PowerSGD
#     under the exact policy; a hung rank (SIGSTOP), whose peer's stalled-step
#     watcher saves from device memory on a stream of its own;
#   - a resize: world 2 (or the GPU count) stopped at step 20 and resumed by one rank,
#     twice, to the same digest;
#   - world 1 with NCCL: torchrun's SIGTERM sent to the rank mid-run.
# Exit status: the number of failed checks.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .gpu-deps/env.sh ] && source .gpu-deps/env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_FR_BUFFER_SIZE=0
build=${BUILD_DIR:-build-gpu}
if [ ! -x "$build/ftcomm" ]; then
  cmake -S . -B "$build" -G Ninja -DFTCOMM_WITH_NCCL=ON -DFTCOMM_BUILD_TESTS=OFF -DTORCH_CUDA_ARCH_LIST=9.0 >/dev/null
  cmake --build "$build" --target ftcomm_cli | tail -1
fi
gpus=$(nvidia-smi -L | wc -l)
if [ "$gpus" -ge 2 ]; then world=$gpus backend=nccl; else world=2 backend=auto; fi
work=$(mktemp -d)
failed=0
port=29900
run() {  # name world backend restarts args...
  local name=$1 w=$2 b=$3 restarts=$4
  shift 4
  port=$((port + 1))
  timeout 300 torchrun --no-python --nproc-per-node="$w" --max-restarts="$restarts" --monitor-interval=0.2 \
    --master-port=$port "$build/ftcomm" train --device cuda --backend "$b" --model charlm --steps "${STEPS:-40}" --log-every 0 \
    --ckpt "$work/$name" --summary-json "$work/$name.json" "$@" >"$work/$name.log" 2>&1
  grep -E "process group|saved step|stalled|SIGTERM|resumed|done" "$work/$name.log" | cut -c1-240
}
same() {  # reference run, message, python condition on r (the run's summary)
  python3 - "$work/$1.json" "$work/$2.json" "$3" <<'EOF'
import json, sys
a, r = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
ok = a["param_digest"] == r["param_digest"] and eval(sys.argv[3])
print(f"  -> digest equal: {a['param_digest'] == r['param_digest']}, resumed from {r['resumed_from_step']}"
      f" (just in time: {r['resumed_just_in_time']}, policy {r['policy']}): {'PASS' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
EOF
}
echo "=== world $world ($backend), charlm on CUDA"
run ref "$world" "$backend" 0 --commit-every 0
run kill "$world" "$backend" 1 --commit-every 0 --fail-at 1:23:hook
same ref kill 'r["resumed_from_step"] == 22 and r["resumed_just_in_time"]' || failed=$((failed + 1))
run psref "$world" "$backend" 0 --hook powersgd --hook-arg start_iter=5
run ps "$world" "$backend" 1 --hook powersgd --hook-arg start_iter=5 --fail-at 1:23:hook
same psref ps 'r["resumed_from_step"] == 20 and r["newest_step"] == 22' || failed=$((failed + 1))
run hang "$world" "$backend" 1 --commit-every 0 --timeout 10 --fail-at 1:13:hang
same ref hang 'r["resumed_from_step"] == 12' || failed=$((failed + 1))

echo "=== resize on CUDA: world $world to 1 (nccl) at step 20, twice: the same digest"
for i in 1 2; do
  STEPS=20 run "rs$i" "$world" "$backend" 0 --global-batch 30 --commit-every 5
  run "rs$i" 1 nccl 0 --global-batch 30 --commit-every 5
done
same rs1 rs2 'r["resumed_from_step"] == 20 and r["resumed_world_size"] == '"$world"' and r["world_size"] == 1' \
  || failed=$((failed + 1))

echo "=== world 1 (nccl): SIGTERM"
STEPS=3000 run ref1 1 nccl 0 --commit-every 0
( timeout 300 torchrun --no-python --nproc-per-node=1 --max-restarts=1 --monitor-interval=0.2 --master-port=29990 \
    "$build/ftcomm" train --device cuda --backend nccl --model charlm --steps 3000 --log-every 0 --commit-every 0 \
    --ckpt "$work/term" --summary-json "$work/term.json" --events "$work/term.events" >"$work/term.log" 2>&1 ) &
for _ in $(seq 1 600); do
  [ -f "$work/term.events" ] && [ "$(grep -c '"event":"step"' "$work/term.events")" -ge 300 ] && break
  sleep 0.1
done
# The worker alone, as torchrun's agent does (its own command line holds the same words).
pkill -TERM -f "^$build/ftcomm train .*--ckpt $work/term"
wait
grep -E "saved step|SIGTERM|resumed|done" "$work/term.log" | cut -c1-240
same ref1 term 'r["resumed_just_in_time"] and r["resumed_from_step"] >= 300' || failed=$((failed + 1))
echo "gpu-jit-check: $failed failed"
exit $failed
