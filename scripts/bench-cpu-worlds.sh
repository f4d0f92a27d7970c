#!/usr/bin/env bash
# The hook-speed matrix on a CPU host (issue 29): Gloo at world 2, 4 and 8, both
# models, in PyTorch's DDP (tests/bench/python_hooks_bench.py: c10d's built-ins,
# PyTorch's Python hooks, ftcomm's hooks) and in the C++ trainer's Reducer
# (ftcomm_bench_hooks), then one table of ratios. Made for the GPU machine's
# 16-core host (its GPU unused): a 2-core machine is too small to judge world 4.
#
#   scripts/bench-cpu-worlds.sh                       # everything, results in $OUT or build/bench-cpu
#   WORLDS="4" MODELS="mlp" scripts/bench-cpu-worlds.sh
#
# Needs the Python package installed and $BUILD_DIR/tests/ftcomm_bench_hooks built
# (scripts/test.sh does both). Threads per rank: 3/4 of the cores divided by the
# world size (at least 1; THREADS overrides), so every rank has cores of its own and
# Gloo's threads some room. CUDA is hidden: PyTorch's powerSGD_hook on CPU tensors
# crashes when CUDA is visible (torch.cuda.synchronize in its decompress step), and
# with several buckets on Gloo, so its models get one bucket (--powersgd-bucket-mb).
#
# Each rank is pinned to its own share of the cores (cores / world; PIN=0 turns it
# off): unpinned ranks wander between cores and take turns with each other's threads,
# and the rounds spread more than the differences measured. REPEATS runs the whole
# matrix several times; the table (tests/bench/cpu_worlds_table.py) gives each
# ratio's median over the repeats and their range (each run's ratio is itself the
# median of its rounds' ratios).
#
# Environment: WORLDS (default "2 4 8"), MODELS ("mlp deep"), CORES (nproc), THREADS,
# REPEATS (1), PIN (1), BUILD_DIR (build), PY_ARGS / CPP_ARGS (extra arguments), SKIP_CPP=1.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${RESULTS:-${OUT:-build/bench-cpu}}
mkdir -p "$out"
cores=${CORES:-$(nproc)}
worlds=${WORLDS:-2 4 8}
models=${MODELS:-mlp deep}
build=${BUILD_DIR:-build}
repeats=${REPEATS:-1}
export CUDA_VISIBLE_DEVICES= FTCOMM_BENCH_PIN=${PIN:-1}
failed=0
port=29800
for rep in $(seq 1 "$repeats"); do
for w in $worlds; do
  threads=${THREADS:-$((cores * 3 / 4 / w))}
  [ "$threads" -ge 1 ] || threads=1
  for m in $models; do
    # deep: 50M parameters, a long CPU step: fewer steps.
    if [ "$m" = deep ]; then set -- 32 3 2; else set -- 64 8 4; fi
    batch=$1 rounds=$2 steps=$3
    echo "=== run $rep/$repeats: world $w, $m, $threads threads per rank, pinned: $FTCOMM_BENCH_PIN ($(date +%T))"
    tag="$m-w$w-r$rep"
    port=$((port + 1))
    OMP_NUM_THREADS=$threads PYTHONUNBUFFERED=1 timeout 900 torchrun --nproc-per-node="$w" --master-port=$port \
      tests/bench/python_hooks_bench.py --device cpu --model "$m" --batch "$batch" --rounds "$rounds" \
      --steps "$steps" --powersgd-bucket-mb 1000 --json "$out/py-$tag.json" ${PY_ARGS:-} \
      >"$out/py-$tag.txt" 2>&1 || { echo "python bench failed:"; tail -20 "$out/py-$tag.txt"; failed=$((failed + 1)); }
    grep -E "^(ftcomm|pytorch|ddp|machinery|target)" "$out/py-$tag.txt"
    if [ "${SKIP_CPP:-0}" != 1 ]; then
      OMP_NUM_THREADS=$threads timeout 900 "$build/tests/ftcomm_bench_hooks" --world "$w" --device cpu --model "$m" \
        --batch "$batch" --rounds "$rounds" --steps "$steps" --json "$out/cpp-$tag.json" ${CPP_ARGS:-} \
        >"$out/cpp-$tag.txt" 2>&1 || { echo "C++ bench failed:"; tail -20 "$out/cpp-$tag.txt"; failed=$((failed + 1)); }
      grep -E "^(ts |builtin|no hook|targets|correctness)" "$out/cpp-$tag.txt"
    fi
  done
done
done
python3 tests/bench/cpu_worlds_table.py "$out" "$cores" "$FTCOMM_BENCH_PIN"
echo "bench-cpu-worlds: $failed run(s) failed; results in $out"
exit "$failed"
