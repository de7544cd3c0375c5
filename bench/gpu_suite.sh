#!/usr/bin/env bash
# One GPU-machine run: build for sm_90, CUDA tests, compute-sanitizer on a small case, the CUDA benchmark; logs into $OUT.
set -u
OUT=${OUT:-/tmp/leakycuda_gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

{ nvidia-smi; python -c "import torch; print(torch.__version__, torch.version.cuda)"; git rev-parse HEAD; } > "$OUT/env.log" 2>&1

echo "== build"
if ! TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  exit 1
fi
tail -3 "$OUT/build.log"

echo "== pytest -m cuda"
# From $OUT, so that `import leakycuda` finds the installed build, not the source tree.
REPO=$(pwd)
(cd "$OUT" && python -m pytest -m cuda "$REPO/tests" -q -x -p no:cacheprovider) > "$OUT/pytest_cuda.log" 2>&1
echo "pytest rc=$?"; tail -5 "$OUT/pytest_cuda.log"

echo "== compute-sanitizer"
: > "$OUT/sanitize.log"
for tool in memcheck racecheck initcheck; do
  echo "--- $tool" >> "$OUT/sanitize.log"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 \
    python bench/sanitize_case.py >> "$OUT/sanitize.log" 2>&1
  echo "$tool rc=$?"
done
tail -20 "$OUT/sanitize.log"

echo "== benchmark"
python bench/bench_stack_cuda.py --out "$OUT/bench_stack_cuda.json" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; tail -20 "$OUT/bench.log"

echo "== ensemble benchmark (issue 10's GPU rows)"
python bench/bench_ensemble.py --device cuda --out "$OUT/bench_ensemble_cuda.json" > "$OUT/bench_ensemble.log" 2>&1
echo "bench_ensemble rc=$?"; tail -20 "$OUT/bench_ensemble.log"
