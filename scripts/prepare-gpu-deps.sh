#!/usr/bin/env bash
# Fills the ignored .gpu-deps/ for a run on the lent GPU machine (no network there):
# the shared script's packages (RocksDB, GoogleTest, Gloo headers) plus what this
# project also builds with: CLI11 and nlohmann-json (header-only) and OpenSSL's
# libcrypto (headers and the library it links), and the Python package's build
# backend and test runner as wheels. Idempotent.
#
#   scripts/prepare-gpu-deps.sh     # then carry .gpu-deps; begin with: source .gpu-deps/env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${FTCOMM_SHARED_DIR:-../shared}
"$shared/gpu/prepare-gpu-deps.sh"
extra=(libcli11-dev nlohmann-json3-dev libssl-dev libssl3)
missing=()
for p in "${extra[@]}"; do
  ls .gpu-deps/debs/"${p}"_*.deb >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "prepare-gpu-deps: downloading ${missing[*]}"
  (cd .gpu-deps/debs && apt-get download "${missing[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
fi
# The Python package's build backend and test runner, as wheels (pure Python).
mkdir -p .gpu-deps/wheels
if ! ls .gpu-deps/wheels/scikit_build_core-*.whl .gpu-deps/wheels/pytest-*.whl >/dev/null 2>&1; then
  echo "prepare-gpu-deps: downloading wheels: scikit-build-core pytest"
  python3 -m pip download -q -d .gpu-deps/wheels --only-binary=:all: "scikit-build-core>=0.10" pytest
fi
ls .gpu-deps/debs .gpu-deps/wheels
