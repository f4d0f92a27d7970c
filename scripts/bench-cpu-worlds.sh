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
# Environment: WORLDS (default "2 4 8"), MODELS ("mlp deep"), CORES (nproc), THREADS,
# BUILD_DIR (build), PY_ARGS / CPP_ARGS (extra arguments), SKIP_CPP=1.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${RESULTS:-${OUT:-build/bench-cpu}}
mkdir -p "$out"
cores=${CORES:-$(nproc)}
worlds=${WORLDS:-2 4 8}
models=${MODELS:-mlp deep}
build=${BUILD_DIR:-build}
export CUDA_VISIBLE_DEVICES=
failed=0
port=29800
for w in $worlds; do
  threads=${THREADS:-$((cores * 3 / 4 / w))}
  [ "$threads" -ge 1 ] || threads=1
  for m in $models; do
    # deep: 50M parameters, a long CPU step: fewer steps.
    if [ "$m" = deep ]; then set -- 32 3 2; else set -- 64 8 4; fi
    batch=$1 rounds=$2 steps=$3
    echo "=== world $w, $m, $threads threads per rank ($(date +%T))"
    port=$((port + 1))
    OMP_NUM_THREADS=$threads PYTHONUNBUFFERED=1 timeout 900 torchrun --nproc-per-node="$w" --master-port=$port \
      tests/bench/python_hooks_bench.py --device cpu --model "$m" --batch "$batch" --rounds "$rounds" \
      --steps "$steps" --powersgd-bucket-mb 1000 --json "$out/py-$m-w$w.json" ${PY_ARGS:-} \
      >"$out/py-$m-w$w.txt" 2>&1 || { echo "python bench failed:"; tail -20 "$out/py-$m-w$w.txt"; failed=$((failed + 1)); }
    grep -E "^(ftcomm|pytorch|ddp|machinery|target)" "$out/py-$m-w$w.txt"
    if [ "${SKIP_CPP:-0}" != 1 ]; then
      OMP_NUM_THREADS=$threads timeout 900 "$build/tests/ftcomm_bench_hooks" --world "$w" --device cpu --model "$m" \
        --batch "$batch" --rounds "$rounds" --steps "$steps" --json "$out/cpp-$m-w$w.json" ${CPP_ARGS:-} \
        >"$out/cpp-$m-w$w.txt" 2>&1 || { echo "C++ bench failed:"; tail -20 "$out/cpp-$m-w$w.txt"; failed=$((failed + 1)); }
      grep -E "^(ts |builtin|no hook|targets|correctness)" "$out/cpp-$m-w$w.txt"
    fi
  done
done
python3 - "$out" "$cores" <<'EOF'
import glob, json, os, sys
out, cores = sys.argv[1], sys.argv[2]
lines = [f"CPU, Gloo, {cores} cores; ratios are step times in one run (below 1: ftcomm faster)", "",
         "| model | world | threads | ftcomm allreduce / c10d | / PyTorch allreduce_hook | fp16 / FP16_COMPRESS "
         "| fp16 / PyTorch | bf16 / PyTorch | powersgd / PyTorch | noop / PyTorch noop_hook | machinery ms/step "
         "| C++: ts allreduce / builtin | C++: ts fp16 / builtin | C++: ts noop / no hook |",
         "| --- " * 13 + "|"]
for path in sorted(glob.glob(os.path.join(out, "py-*-w*.json")), key=lambda p: (p.split("-")[-2], int(p.split("w")[-1][:-5]))):
    py = json.load(open(path))
    rows = {r["method"]: r for r in py["rows"]}
    def ratio(name, key):
        r = rows.get(name)
        return f"{r[key]:.3f}" if r and r.get(key) is not None else "-"
    model = os.path.basename(path).split("-")[1]
    noop, pt_noop = rows.get("ftcomm noop"), rows.get("pytorch noop_hook")
    machinery = f"{noop['step_ms'] - pt_noop['step_ms']:+.2f}" if noop and pt_noop else "-"
    cpp_path = path.replace("py-", "cpp-")
    c = ["-", "-", "-"]
    threads = "-"
    if os.path.exists(cpp_path):
        cpp = json.load(open(cpp_path))
        med = cpp["median_step_ms"]
        threads = str(cpp.get("threads", "-"))
        c = [f"{med['ts allreduce'] / med['builtin ALLREDUCE']:.3f}",
             f"{med['ts fp16_compress'] / med['builtin FP16_COMPRESS']:.3f}",
             f"{med['ts noop'] / med['no hook']:.3f}"]
    lines.append(f"| {model} | {py['world']} | {threads} | {ratio('ftcomm allreduce', 'vs_c10d_builtin')} "
                 f"| {ratio('ftcomm allreduce', 'vs_pytorch_hook')} | {ratio('ftcomm fp16_compress', 'vs_c10d_builtin')} "
                 f"| {ratio('ftcomm fp16_compress', 'vs_pytorch_hook')} | {ratio('ftcomm bf16_compress', 'vs_pytorch_hook')} "
                 f"| {ratio('ftcomm powersgd r4', 'vs_pytorch_hook')} | {ratio('ftcomm noop', 'vs_pytorch_hook')} "
                 f"| {machinery} | {c[0]} | {c[1]} | {c[2]} |")
open(os.path.join(out, "table.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "bench-cpu-worlds: $failed run(s) failed; results in $out"
exit "$failed"
