# Sourced by the scripts/gpu-*.sh entry points (from the repository root): the
# carried dependencies of the lent GPU machine (.gpu-deps, when present), NVLink
# multicast off, and the build and results directories ($BUILD_DIR, default
# build-gpu; $RESULTS, else $OUT, else $build/results).
[ -f .gpu-deps/env.sh ] && source .gpu-deps/env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
build=${BUILD_DIR:-build-gpu}
results=${RESULTS:-${OUT:-$build/results}}
mkdir -p "$results"

# gpu_build TARGET...: the Python package (once), then a Release configure with NCCL
# and the named targets in $build; the machine, once built.
gpu_build() {
  if ! python3 -c 'import ftcomm' 2>/dev/null; then
    python3 -m pip install -q --no-index --find-links .gpu-deps/wheels scikit-build-core pytest &&
      python3 -m pip install -q --no-build-isolation . >"$results/pip.log" 2>&1 ||
      { tail -30 "$results/pip.log"; return 1; }
  fi
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFTCOMM_WITH_NCCL=ON -DTORCH_CUDA_ARCH_LIST=9.0 \
    >"$results/configure.log" 2>&1 || { tail -30 "$results/configure.log"; return 1; }
  cmake --build "$build" --target "$@" 2>&1 | tail -2 || return 1
  nvidia-smi -L; lscpu | grep -E "Model name|^CPU\(s\)"
}
