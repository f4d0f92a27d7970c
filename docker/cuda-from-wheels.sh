#!/bin/sh
# The CUDA compiler pieces that CMake needs to configure against torch's CUDA
# wheel, from PyPI, in an image without a CUDA toolkit: find_package(Torch)
# enables the CUDA language for a CUDA build of torch, which needs a working nvcc.
# Installs nvcc, nvvm, crt and cccl (whose nv/target CUDA's headers include) wheels
# of the CUDA runtime's major.minor version (the
# runtime, its headers and NCCL's came with torch), adds the unversioned library
# links and the lib64 directory CMake looks for, and links /opt/cuda to it all.
# ftcomm compiles no CUDA code; nvcc only has to pass CMake's check.
set -eu
site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
runtime=$(python3 -m pip show nvidia-cuda-runtime 2>/dev/null | sed -n 's/^Version: //p')
[ -n "$runtime" ] || { echo "cuda-from-wheels: torch brought no nvidia-cuda-runtime (a CPU wheel?); nothing to do"; exit 0; }
mm=$(echo "$runtime" | cut -d. -f1,2)
root=$site/nvidia/cu$(echo "$mm" | cut -d. -f1)
python3 -m pip install -q "nvidia-cuda-nvcc==$mm.*" "nvidia-nvvm==$mm.*" "nvidia-cuda-crt==$mm.*" \
  "nvidia-cuda-cccl==$mm.*"
for lib in cudart nvrtc; do
  real=$(ls "$root/lib/lib$lib.so."* 2>/dev/null | head -1)
  [ -n "$real" ] && ln -sf "$(basename "$real")" "$root/lib/lib$lib.so"
done
[ -e "$root/lib64" ] || ln -s lib "$root/lib64"
ln -sfn "$root" /opt/cuda
[ -d "$root/include/cccl/nv" ] || { echo "cuda-from-wheels: no $root/include/cccl/nv after installing nvidia-cuda-cccl" >&2; exit 1; }
echo "cuda-from-wheels: CUDA runtime $runtime; nvcc $("$root/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') at /opt/cuda -> $root"
