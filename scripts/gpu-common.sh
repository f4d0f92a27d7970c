# Sourced by the scripts/gpu-*.sh entry points (from the repository root): the
# carried dependencies of the lent GPU machine (.gpu-deps, when present), NVLink
# multicast off, and the build and results directories ($BUILD_DIR, default
# build-gpu; $RESULTS, else $OUT, else $build/results).
[ -f .gpu-deps/env.sh ] && source .gpu-deps/env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
build=${BUILD_DIR:-build-gpu}
results=${RESULTS:-${OUT:-$build/results}}
mkdir -p "$results"
