#!/usr/bin/env bash
# GPU-machine stages: build for sm_90, bad-input triage, CUDA tests, compute-sanitizer on small cases, the CUDA
# benchmarks (stack, energies, ensembles); logs and JSON into $OUT. BENCH_ARGS passes options to the stack
# benchmark (e.g. --only models16_L20_tf32,paper_linear_tf32).
#   bash bench/gpu_suite.sh                       every stage, in order (longer than one 10-minute device call)
#   bash bench/gpu_suite.sh build triage tests    the named stages only; a machine still warm from an earlier
#                                                 call keeps its installed build, so later calls can skip build
# Stages: build triage tests sanitize bench-stack bench-energies bench-ensemble
# For one 10-minute device call, bench/gpu_check.sh runs the build, the selftest, the CUDA tests, the demo and the
# benches' quick rows inside a 9-minute budget.
set -u
OUT=${OUT:-/tmp/leakycuda_gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

{ nvidia-smi; python -c "import torch; print(torch.__version__, torch.version.cuda)"; git rev-parse HEAD; } > "$OUT/env.log" 2>&1

REPO=$(pwd)

stage_build() {
  echo "== build"
  if ! TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"
    exit 1
  fi
  tail -3 "$OUT/build.log"
}

stage_triage() {
  echo "== triage"
  echo "   bad-input triage (at e83cbb6 these three killed the process with SIGSEGV)"
  # Each in its own process, from $OUT (the installed build); on a crash, the Python stack (faulthandler) and,
  # when gdb exists, the native backtrace go to $OUT/triage_<case>.log.
  declare -A TRIAGE=(
    [rho_negative]="ops.leaky_stack(x0, W, -r, 1.0, False, 1)"
    [rho_nan]="r[1] = float('nan'); ops.leaky_stack(x0, W, r, 1.0, False, 1)"
    [W_without_bias]="ops.leaky_stack(x0, W[..., :4], r, 1.0, False, 1)"
  )
  for case in "${!TRIAGE[@]}"; do
    code="import torch, leakycuda
ops = torch.ops.leakycuda
x0, W, r = torch.randn(5, 4, device='cuda'), torch.randn(3, 4, 5, device='cuda'), torch.full((3,), 1 / 3, device='cuda')
try:
    ${TRIAGE[$case]}
    print('no error raised')
except Exception as e:
    print(type(e).__name__, str(e).splitlines()[0])"
    (cd "$OUT" && python -X faulthandler -c "$code") > "$OUT/triage_$case.log" 2>&1
    rc=$?
    echo "$case rc=$rc: $(tail -1 "$OUT/triage_$case.log")"
    if [ $rc -ne 0 ] && command -v gdb >/dev/null 2>&1; then
      (cd "$OUT" && gdb -q -batch -ex run -ex bt -ex "info sharedlibrary" --args python -c "$code") >> "$OUT/triage_$case.log" 2>&1
    fi
  done
}

stage_tests() {
  echo "== pytest -m cuda"
  # From $OUT, so that `import leakycuda` finds the installed build, not the source tree.
  (cd "$OUT" && python -m pytest -m cuda "$REPO/tests" -q -rf -p no:cacheprovider) > "$OUT/pytest_cuda.log" 2>&1
  echo "pytest rc=$?"; tail -15 "$OUT/pytest_cuda.log"
}

stage_sanitize() {
  echo "== compute-sanitizer"
  : > "$OUT/sanitize.log"
  for tool in memcheck racecheck initcheck; do
    echo "--- $tool" >> "$OUT/sanitize.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 \
      python bench/sanitize_case.py >> "$OUT/sanitize.log" 2>&1
    echo "$tool rc=$?"
  done
  tail -20 "$OUT/sanitize.log"
}

stage_bench_stack() {
  echo "== benchmark"
  python bench/bench_stack_cuda.py --out "$OUT/bench_stack_cuda.json" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; tail -20 "$OUT/bench.log"
}

stage_bench_energies() {
  echo "== energies benchmark"
  python bench/bench_energies.py --device cuda --out "$OUT/bench_energies_cuda.json" > "$OUT/bench_energies.log" 2>&1
  echo "bench_energies rc=$?"; tail -12 "$OUT/bench_energies.log"
}

stage_bench_ensemble() {
  echo "== ensemble benchmark (its GPU rows)"
  python bench/bench_ensemble.py --device cuda --out "$OUT/bench_ensemble_cuda.json" > "$OUT/bench_ensemble.log" 2>&1
  echo "bench_ensemble rc=$?"; tail -20 "$OUT/bench_ensemble.log"
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(build triage tests sanitize bench-stack bench-energies bench-ensemble)
for st in "${stages[@]}"; do
  case "$st" in
    build|triage|tests|sanitize|bench-stack|bench-energies|bench-ensemble) "stage_${st//-/_}" || exit 1 ;;
    *) echo "gpu_suite.sh: unknown stage '$st' (stages: build triage tests sanitize bench-stack bench-energies bench-ensemble)"; exit 2 ;;
  esac
done
