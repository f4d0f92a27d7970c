#!/usr/bin/env bash
# Fills the ignored .gpu-deps/ for a run on the lent GPU machine (no network there):
# the shared script's packages (RocksDB, GoogleTest, Gloo headers) plus what this
# project also builds with: CLI11 and nlohmann-json (header-only) and OpenSSL's
# libcrypto (headers and the library it links). Idempotent.
#
#   scripts/prepare-gpu-deps.sh     # then carry .gpu-deps; begin with: source .gpu-deps/env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${FTCOMM_SHARED_DIR:-../shared}
"$shared/gpu/prepare-gpu-deps.sh"
extra=(libcli11-dev nlohmann-json3-dev libssl-dev libssl3)
missing=()
for p in "${extra[@]}"; do ls .gpu-deps/debs/"${p}"_*.deb >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "prepare-gpu-deps: downloading ${missing[*]}"
  (cd .gpu-deps/debs && apt-get download "${missing[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
fi
ls .gpu-deps/debs
