#!/usr/bin/env bash
# Installs what ftcomm builds against. Idempotent: each step checks first and says
# what it does. Safe to run on a fresh Debian 12 machine or again on a set-up one.
#
#   scripts/setup.sh            # Debian packages, torch==2.11.0 from PyPI, the ftcomm Python package
#
# Environment:
#   FTCOMM_TORCH_VERSION  torch version to pin (default 2.11.0)
#   PYTHON                interpreter to install torch and ftcomm into (default python3)
#   FTCOMM_SKIP_PYTHON_PACKAGE=1   skip building and installing the Python package
set -euo pipefail

TORCH_VERSION=${FTCOMM_TORCH_VERSION:-2.11.0}
PYTHON=${PYTHON:-python3}
say() { printf 'setup: %s\n' "$*"; }

debs=(librocksdb-dev libgtest-dev libgloo-dev libcli11-dev nlohmann-json3-dev libssl-dev ninja-build ccache cmake g++)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages present: ${debs[*]}"
fi

have=$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ "$have" != "$TORCH_VERSION" ]; then
  say "installing torch==$TORCH_VERSION from PyPI into $("$PYTHON" -c 'import sys; print(sys.prefix)') (found: ${have:-none}); this downloads a few GB once"
  "$PYTHON" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
else
  say "torch $have present"
fi
say "torch cmake prefix: $("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"

# The Python package's build backend and test runner, then the package itself:
# built against this torch (its bundled pybind11), incrementally in build-py/.
pydeps=()
"$PYTHON" -c 'import scikit_build_core' 2>/dev/null || pydeps+=("scikit-build-core>=0.10")
"$PYTHON" -c 'import pytest' 2>/dev/null || pydeps+=(pytest)
"$PYTHON" -c 'import yaml' 2>/dev/null || pydeps+=(pyyaml)  # tests/python/test_docker_files.py
if ((${#pydeps[@]})); then
  say "installing from PyPI: ${pydeps[*]}"
  "$PYTHON" -m pip install -q --disable-pip-version-check "${pydeps[@]}"
else
  say "scikit-build-core, pytest and pyyaml present"
fi
if [ "${FTCOMM_SKIP_PYTHON_PACKAGE:-0}" != 1 ]; then
  say "installing the ftcomm Python package (pip install --no-build-isolation .; the first build takes a few minutes)"
  source "$(dirname "$0")/ccache-env.sh"
  (cd "$(dirname "$0")/.." && "$PYTHON" -m pip install -q --disable-pip-version-check --no-build-isolation .)
  say "ftcomm $("$PYTHON" -c 'import ftcomm; print(ftcomm.__version__)' 2>/dev/null) importable"
fi
say "done"
