#!/usr/bin/env bash
# Compiles the torch glue (csrc/cuda/*.cu) with nvcc against the installed torch's headers, even when that
# torch is a CPU build: a CPU torch ships the c10/cuda and ATen/cuda headers but not the generated
# c10/cuda/impl/cuda_cmake_macros.h, which a stub supplies. Host code is compiled in full; device code
# only to PTX for one architecture (no ptxas), so this checks that the launchers compile against the
# kernels and the op interface, not what a CUDA build of torch links.
#   .ci/check_cuda_glue.sh [compute_XX]     (default compute_90)
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-compute_90}
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
echo '#pragma once' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
mapfile -t incs < <(python -c "import torch.utils.cpp_extension as c; print('\n'.join(c.include_paths()))")
abi=$(python -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
# The flags torch's CUDAExtension gives nvcc (no half operators, relaxed constexpr).
read -r -a common < <(python -c "from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as f; print(' '.join(f))")
for src in csrc/cuda/*.cu; do
  echo "== nvcc $src ($arch)"
  nvcc -std=c++17 "${common[@]}" -O0 -c "$src" -o "$stub/$(basename "$src").o" \
    -gencode "arch=$arch,code=$arch" -Icsrc "${incs[@]/#/-I}" -I"$stub" \
    -D_GLIBCXX_USE_CXX11_ABI="$abi" -DLEAKYCUDA_WITH_CUDA=1 -Werror all-warnings \
    -diag-suppress 3306,20012,20014 -Xcompiler -Wno-c++20-extensions
done
echo "ok"
