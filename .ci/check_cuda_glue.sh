#!/usr/bin/env bash
# Compiles the torch glue (csrc/cuda/*.cu and the leaky stack's per-(storage type, activation) units that
# csrc/gen_units.py generates) with nvcc against the installed torch's headers, even when that torch is a
# CPU build: a CPU torch ships the c10/cuda and ATen/cuda headers but not the generated
# c10/cuda/impl/cuda_cmake_macros.h, which a stub supplies. Host code is compiled in full; device code
# only to PTX for one architecture (no ptxas), so this checks that the launchers compile against the
# kernels and the op interface, not what a CUDA build of torch links. Units compile JOBS at a time
# (default: one per core); each one's time is printed.
#   .ci/check_cuda_glue.sh [compute_XX]     (default compute_90)
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-compute_90}
jobs=${JOBS:-$(nproc)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/stub/c10/cuda/impl" "$tmp/obj"
echo '#pragma once' > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
mapfile -t incs < <(python -c "import torch.utils.cpp_extension as c; print('\n'.join(c.include_paths()))")
abi=$(python -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
# The flags torch's CUDAExtension gives nvcc (no half operators, relaxed constexpr).
read -r -a common < <(python -c "from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as f; print(' '.join(f))")
mapfile -t srcs < <(ls csrc/cuda/*.cu; python csrc/gen_units.py launch "$tmp/units")

# One unit: compile, then print its time and (on failure or warnings) its output in one piece.
{
  echo '#!/usr/bin/env bash'
  printf 'src=$1; log=%q/obj/$(basename "$src").log; start=$(date +%%s.%%N)\n' "$tmp"
  printf 'nvcc -std=c++17'
  printf ' %q' "${common[@]}" -O0 -gencode "arch=$arch,code=$arch" -Icsrc "${incs[@]/#/-I}" -I"$tmp/stub" \
    -D_GLIBCXX_USE_CXX11_ABI="$abi" -DLEAKYCUDA_WITH_CUDA=1 -Werror all-warnings \
    -diag-suppress 3306,20012,20014 -Xcompiler -Wno-c++20-extensions
  printf ' -c "$src" -o %q/obj/$(basename "$src").o >"$log" 2>&1 && rc=0 || rc=$?\n' "$tmp"
  echo 'secs=$(awk -v a="$start" -v b="$(date +%s.%N)" "BEGIN { printf \"%.1f\", b - a }")'
  echo 'out=$(printf "== %6s s  %s" "$secs" "$src"; [ $rc -eq 0 ] || echo " FAILED"; cat "$log")'
  echo 'echo "$out"; exit $rc'
} > "$tmp/compile.sh"
chmod +x "$tmp/compile.sh"

echo "== nvcc: ${#srcs[@]} units ($arch), $jobs at a time"
start=$(date +%s)
printf '%s\n' "${srcs[@]}" | xargs -P "$jobs" -n 1 "$tmp/compile.sh"
echo "== ${#srcs[@]} units in $(( $(date +%s) - start )) s"

# What the units and ops.cpp's CUDA registrations need of each other must be defined by one of them: the
# stack's launches (leakycuda::stack_cuda::*, one unit per instance-list pair) and the *_cuda entry points.
echo "== link check: csrc/ops.cpp (with LEAKYCUDA_WITH_CUDA) and the units"
c++ -std=c++17 -c csrc/ops.cpp -o "$tmp/obj/ops.o" -Icsrc "${incs[@]/#/-I}" -D_GLIBCXX_USE_CXX11_ABI="$abi" \
  -DLEAKYCUDA_WITH_CUDA=1 -DLEAKYCUDA_NO_PYTHON -w
pattern='^_ZN9leakycuda(10stack_cuda|[0-9]+[a-z0-9_]*_cudaE)'
nm --undefined-only "$tmp"/obj/*.o | awk '{print $NF}' | grep -E "$pattern" | sort -u > "$tmp/need.txt" || true
nm --defined-only "$tmp"/obj/*.cu.o | awk '{print $NF}' | sort -u > "$tmp/have.txt"
missing=$(comm -23 "$tmp/need.txt" "$tmp/have.txt")
if [ -n "$missing" ]; then
  echo "undefined across the units:"; echo "$missing" | c++filt; exit 1
fi
echo "ok: $(wc -l < "$tmp/need.txt") cross-unit symbols defined"
