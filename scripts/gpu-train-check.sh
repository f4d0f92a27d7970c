#!/usr/bin/env bash
# On a GPU machine: `ftcomm train --device cuda` resumes bit-exactly after a SIGKILL,
# with NCCL at world size 1 and with Gloo over CUDA tensors at world size 2 on one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .gpu-deps/env.sh ] && source .gpu-deps/env.sh
cmake -S . -B build-gpu -G Ninja -DFTCOMM_WITH_NCCL=ON -DFTCOMM_BUILD_TESTS=OFF -DTORCH_CUDA_ARCH_LIST=9.0 >/dev/null
cmake --build build-gpu --target ftcomm_cli | tail -1
work=$(mktemp -d)
check() {  # world backend
  local args=(train --device cuda --backend "$2" --model charlm --steps 40 --hook powersgd --hook-arg start_iter=5 --log-every 20)
  torchrun --no-python --nproc-per-node="$1" --master-port=29871 build-gpu/ftcomm "${args[@]}" \
    --ckpt "$work/a$1" --summary-json "$work/a$1.json" 2>&1 | grep -E "process group|done"
  torchrun --no-python --nproc-per-node="$1" --max-restarts=1 --master-port=29872 build-gpu/ftcomm "${args[@]}" \
    --ckpt "$work/b$1" --summary-json "$work/b$1.json" --fail-at "$(($1 - 1)):23:hook" 2>&1 | grep -E "resumed|done"
  python3 -c "import json,sys; a=json.load(open('$work/a$1.json')); b=json.load(open('$work/b$1.json')); ok=a['param_digest']==b['param_digest']; print('world $1 $2 cuda: digest equal', ok); sys.exit(0 if ok else 1)"
}
check 1 nccl
check 2 auto
