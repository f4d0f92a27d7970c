#!/usr/bin/env bash
# The multi-GPU run: one process per GPU of this host, NCCL at world size = GPU count.
#   build      configure and build everything in build-gpu/
#   tests      the full test suite (its MultiGpu cases run NCCL at world = GPU count)
#   hooks      hook step times through the Reducer on CUDA over NCCL (torchrun)
#   recovery   ftcomm train under torchrun: kill a rank, resume, compare the final
#              digest with an uninterrupted run
#   broadcast  broadcast_coalesced benchmark over NCCL
#   fallback   a forced NCCL init failure falls back to Gloo
#   python     the Python package: installed from the carried wheels' build tools, its
#              pytest suite on the GPUs (NCCL, CUDA RNG), its hook and commit benchmarks
# STAGES picks stages (default: all of them, in this order); QUICK=1 is
# STAGES="build recovery broadcast fallback" with only the targets those need.
# Results go to $RESULTS (default $OUT or build-gpu/results). Exit status: the
# number of stages that failed.
#
#   scripts/gpu-multi.sh                      # on a host with 2 to 8 GPUs
#   STAGES="hooks broadcast" scripts/gpu-multi.sh
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .gpu-deps/env.sh ] && source .gpu-deps/env.sh
# NVLink multicast stays off: the shared GPU hosts this runs on require it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
results=${RESULTS:-${OUT:-build-gpu/results}}
mkdir -p "$results"
if ! gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); then
  echo "gpu-multi: nvidia-smi found no GPU; run this on a host with 2 to 8 GPUs" >&2
  exit 2
fi
nvidia-smi -L | tee "$results/gpus.txt"
[ "$gpus" -ge 2 ] || echo "gpu-multi: only $gpus GPU; the MultiGpu tests will skip and world size is 1"
stages=${STAGES:-build tests hooks recovery broadcast fallback python}
[ "${QUICK:-0}" = 1 ] && stages="build recovery broadcast fallback"
failed=0
stage() { echo; echo "=== $1 ($(date +%T))"; }
note_failure() { echo "gpu-multi: stage $1 FAILED"; failed=$((failed + 1)); }

for s in $stages; do
  case $s in
    build)
      stage "build"
      cmake -S . -B build-gpu -G Ninja -DFTCOMM_WITH_NCCL=ON -DTORCH_CUDA_ARCH_LIST=9.0 >/dev/null || note_failure build
      if [ "${QUICK:-0}" = 1 ]; then
        cmake --build build-gpu --target ftcomm_cli ftcomm_bench_broadcast | tail -1
      else
        cmake --build build-gpu | tail -1
      fi
      [ "${PIPESTATUS[0]}" = 0 ] || note_failure build ;;
    tests)
      stage "tests, world $gpus"
      ctest --test-dir build-gpu --output-on-failure -j 8 ${CTEST_ARGS:-} >"$results/ctest.log" 2>&1 || note_failure tests
      grep -E "MultiGpu|tests passed|Failed|\*\*\*" "$results/ctest.log" | tail -20 ;;
    hooks)
      stage "hook step times, CUDA over NCCL, world $gpus"
      # mlp: short backward, the hooks' fixed costs exposed; deep: long backward.
      for m in "mlp 256" "deep 1024"; do
        set -- $m
        torchrun --no-python --nproc-per-node="$gpus" --master-port=29741 build-gpu/tests/ftcomm_bench_hooks --device cuda \
          --model "$1" --batch "$2" --rounds 5 --steps 10 --json "$results/bench-hooks-nccl-$1.json" \
          >"$results/bench-hooks-nccl-$1.txt" 2>&1 || note_failure hooks
        tail -16 "$results/bench-hooks-nccl-$1.txt"
      done ;;
    recovery)
      stage "recovery under torchrun, NCCL, world $gpus"
      w=$(mktemp -d)
      a=(train --device cuda --backend nccl --model charlm --steps 40 --hook powersgd --hook-arg start_iter=5 --log-every 20)
      torchrun --no-python --nproc-per-node="$gpus" --master-port=29742 build-gpu/ftcomm "${a[@]}" --ckpt "$w/a" \
        --summary-json "$w/a.json" 2>&1 | grep -E "process group|done" | tee "$results/recovery.txt"
      torchrun --no-python --nproc-per-node="$gpus" --max-restarts=1 --master-port=29743 build-gpu/ftcomm "${a[@]}" \
        --ckpt "$w/b" --summary-json "$w/b.json" --fail-at "$((gpus - 1)):23:hook" 2>&1 | grep -E "resumed|done" \
        | tee -a "$results/recovery.txt"
      python3 -c "import json; a=json.load(open('$w/a.json')); b=json.load(open('$w/b.json')); \
ok=a['param_digest']==b['param_digest']; print('digest equal', ok); raise SystemExit(0 if ok else 1)" \
        | tee -a "$results/recovery.txt"
      [ "${PIPESTATUS[0]}" = 0 ] || note_failure recovery ;;
    broadcast)
      stage "broadcast_coalesced over NCCL, world $gpus"
      torchrun --no-python --nproc-per-node="$gpus" --master-port=29744 build-gpu/tests/ftcomm_bench_broadcast \
        --device cuda --backend nccl --iters 5 --json "$results/bench-broadcast-nccl.json" \
        >"$results/bench-broadcast-nccl.txt" 2>&1 || note_failure broadcast
      tail -18 "$results/bench-broadcast-nccl.txt" ;;
    fallback)
      stage "forced NCCL init failure"
      NCCL_NET=ftcomm-no-such-net torchrun --no-python --nproc-per-node="$gpus" --master-port=29745 build-gpu/ftcomm \
        doctor 2>&1 | grep -E "process group|doctor" | tee "$results/fallback.txt"
      grep -q "cuda->gloo" "$results/fallback.txt" || note_failure fallback ;;
    python)
      stage "the Python package on $gpus GPUs"
      python3 -m pip install -q --no-index --find-links .gpu-deps/wheels scikit-build-core pytest >/dev/null 2>&1
      python3 -m pip install -q --no-build-isolation . >"$results/pip.log" 2>&1 || { note_failure python; tail "$results/pip.log"; continue; }
      FTCOMM_TEST_DEVICE=cuda python3 -m pytest -q tests/python -k "recovery or restarted" \
        >"$results/pytest-cuda.log" 2>&1 || note_failure python
      tail -5 "$results/pytest-cuda.log"
      for m in "mlp 256" "deep 1024"; do
        set -- $m
        torchrun --nproc-per-node="$gpus" --master-port=29746 tests/bench/python_hooks_bench.py --device cuda \
          --model "$1" --batch "$2" --rounds 5 --steps 10 --json "$results/bench-py-hooks-nccl-$1.json" \
          >"$results/bench-py-hooks-nccl-$1.txt" 2>&1 || note_failure python
        tail -16 "$results/bench-py-hooks-nccl-$1.txt"
      done
      torchrun --nproc-per-node="$gpus" --master-port=29747 tests/bench/ft_commit_bench.py --device cuda \
        --dir "$(mktemp -d)" --json "$results/bench-commit-cuda.json" >"$results/bench-commit-cuda.txt" 2>&1 \
        || note_failure python
      tail -12 "$results/bench-commit-cuda.txt" ;;
    *) echo "gpu-multi: unknown stage '$s' (known: build tests hooks recovery broadcast fallback python)" >&2; exit 2 ;;
  esac
done
echo
echo "gpu-multi: $failed stage(s) failed; results in $results"
exit "$failed"
