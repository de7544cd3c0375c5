#!/usr/bin/env bash
# One device call: build for sm_90, `leakycuda selftest --device cuda`, `pytest -m cuda`, the demo, and the quick
# rows of each GPU benchmark, each stage under its own time limit and inside one overall budget (BUDGET_S, default
# 540 s = 9 minutes, the build included), so that one failing or hanging stage does not stop the rest. Logs and JSON
# go into $OUT as three files, rewritten after every stage: gpu_check.tar.gz (every log and JSON), summary.txt
# (printed last) and summary.json.
#
#   COMMIT=<hash> bash bench/gpu_check.sh        every stage (COMMIT: the commit measured, for a tree without .git;
#                                               git rev-parse HEAD when git works there)
#   bash bench/gpu_check.sh selftest pytest      the named stages only (a machine still warm keeps its build)
#   DEVICE=cpu bash bench/gpu_check.sh           rehearsal on the CPU: no build (the extension already built in the
#                                               tree, on PYTHONPATH), tiny sizes, otherwise the same commands
#   bash bench/gpu_check.sh fingerprint          prints the source fingerprint that summary.json records, and exits
#   STAGE_LIMITS=pytest=120,demo=60 ...          other per-stage limits (seconds) than CAP below
# Stages: env build selftest pytest demo bench-stack bench-energies bench-ensemble
# Python stages run from a folder outside the repository, so that `import leakycuda` finds the installed build.
# The work folder (mktemp -d under TMPDIR) is removed at the end unless KEEP_WORK=1; the tarball holds all of it.
# shellcheck disable=SC2317  # the stage_* functions run through `bash -c "$(declare -f ...)"`, which shellcheck
#                            # cannot follow
set -u

STAGES=(env build selftest pytest demo bench-stack bench-energies bench-ensemble)
# Each stage's own time limit on the GPU, in seconds (the overall budget may cut it shorter).
declare -A CAP=([env]=60 [build]=330 [selftest]=120 [pytest]=240 [demo]=120 [bench-stack]=150
                [bench-energies]=90 [bench-ensemble]=120)
RESERVE_S=20     # kept back from the budget for the last summary and packing
MIN_STAGE_S=15   # a stage that would get less than this is skipped

REPO=$(cd "$(dirname "$0")/.." && pwd)
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/leakycuda_gpu_check}
BUDGET_S=${BUDGET_S:-540}
PY=
for candidate in ${PYTHON:-} python3 python; do  # PYTHON, else the first that imports torch
  if "$candidate" -c "import torch" >/dev/null 2>&1; then PY=$candidate; break; fi
done

fingerprint() {
  # sha256 over the sources that decide what runs (the same files here and in a copied tree without .git).
  (cd "$REPO" && find csrc leakycuda bench tests setup.py pyproject.toml CMakeLists.txt -type f \
      \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.cpp' -o -name '*.sh' \
         -o -name '*.toml' -o -name '*.txt' \) -not -path '*/__pycache__/*' -not -name '_build_info.py' \
      | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
}

selected=()
for arg in "$@"; do
  case "$arg" in
    fingerprint) fingerprint; exit 0 ;;
    env|build|selftest|pytest|demo|bench-stack|bench-energies|bench-ensemble) selected+=("$arg") ;;
    *) echo "gpu_check.sh: unknown stage '$arg' (stages: ${STAGES[*]}; or fingerprint)" >&2; exit 2 ;;
  esac
done
[ ${#selected[@]} -gt 0 ] || selected=("${STAGES[@]}")
case "$DEVICE" in
  cpu|cuda|cuda:[0-9]*) ;;
  *) echo "gpu_check.sh: DEVICE must be cpu, cuda or cuda:<i>, got '$DEVICE'" >&2; exit 2 ;;
esac
case "$BUDGET_S" in
  ''|*[!0-9]*) echo "gpu_check.sh: BUDGET_S must be a whole number of seconds, got '$BUDGET_S'" >&2; exit 2 ;;
esac
if [ -n "${STAGE_LIMITS:-}" ]; then
  IFS=, read -r -a pairs <<< "$STAGE_LIMITS"
  for pair in "${pairs[@]}"; do
    name=${pair%%=*} value=${pair#*=}
    if [[ "$pair" != *=* || -z "$name" || ! "$value" =~ ^[0-9]+$ ]] || [ -z "${CAP[$name]+set}" ]; then
      echo "gpu_check.sh: STAGE_LIMITS must be stage=seconds[,stage=seconds...] (stages: ${STAGES[*]}), got" \
        "'$STAGE_LIMITS'" >&2
      exit 2
    fi
    CAP[$name]=$value
  done
fi
if [ -z "$PY" ]; then
  echo "gpu_check.sh: no Python with torch found (tried ${PYTHON:-} python3 python; set PYTHON)" >&2; exit 2
fi
if ! mkdir -p "$OUT" 2>/dev/null || [ ! -w "$OUT" ]; then
  echo "gpu_check.sh: cannot write in OUT=$OUT" >&2; exit 2
fi

if [ -z "${COMMIT:-}" ]; then  # given: taken as it is; else git's HEAD (-dirty with uncommitted changes)
  COMMIT=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
  if [ "$COMMIT" != unknown ] && [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    COMMIT="$COMMIT-dirty"
  fi
fi
export LEAKYCUDA_COMMIT=$COMMIT   # every bench JSON records it (leakycuda._env.git_commit)
FINGERPRINT=$(fingerprint)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$WORK/logs" "$WORK/json" "$WORK/run"
RUN=$WORK/run   # the working folder of the Python stages (no leakycuda source there)
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
REHEARSAL=0
[ "$DEVICE" = cpu ] && REHEARSAL=1
printf 'stage\tstatus\trc\tseconds\tlimit_s\tnote\n' > "$WORK/stages.tsv"
{
  echo "commit=$COMMIT"; echo "fingerprint=$FINGERPRINT"; echo "device=$DEVICE"; echo "rehearsal=$REHEARSAL"
  echo "budget_s=$BUDGET_S"; echo "python=$(command -v "$PY")"; echo "stages=${selected[*]}"; echo "started=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$WORK/meta.txt"
export REPO DEVICE PY WORK RUN REHEARSAL

# --- stages (each runs as `bash -c` under timeout, from $RUN; stdout and stderr go to logs/<stage>.log) ---------

stage_env() {
  cd "$RUN" || exit 1
  echo "commit $LEAKYCUDA_COMMIT"; uname -a; nproc; date -u
  if [ "$REHEARSAL" = 0 ]; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
    nvcc --version
  fi
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'available', torch.cuda.is_available())"
  XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" \
    || echo "jax: not usable (its rows are left out)"
  "$PY" -c "import pytest_timeout" 2>/dev/null && echo "pytest-timeout: yes" || echo "pytest-timeout: no"
  true
}

stage_build() {
  cd "$REPO" || exit 1
  if [ "$REHEARSAL" = 1 ]; then
    echo "rehearsal: no build; the extension already built in the tree is used"
  else
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install --no-build-isolation --no-deps \
      --force-reinstall -v . || exit 1
  fi
  cd "$RUN" || exit 1
  # what `import leakycuda` finds from here must be a build with kernels for DEVICE
  "$PY" -c "
import sys, torch, leakycuda
b = leakycuda.build_info
print('leakycuda from', leakycuda.__file__, 'with_cuda', b.with_cuda, 'arch', b.cuda_arch_list)
key = 'CPU' if sys.argv[1] == 'cpu' else 'CUDA'
missing = [op for op in ('leaky_stack', 'energies') if not torch._C._dispatch_has_kernel_for_dispatch_key('leakycuda::' + op, key)]
sys.exit('no %s kernels for %s' % (key, missing) if missing else 0)" "$DEVICE"
}

stage_selftest() {
  cd "$RUN" && "$PY" -m leakycuda.cli selftest --device "$DEVICE" --json "$WORK/json/selftest.json"
}

stage_pytest() {
  cd "$RUN" || exit 1
  local extra=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=120 --timeout-method=thread)
  # -m cuda on the CPU collects the same tests and skips them: a rehearsal of the command, not of the tests
  "$PY" -m pytest -m cuda "$REPO/tests" -v -rfE -p no:cacheprovider --durations=15 \
    --junitxml="$WORK/json/pytest_cuda.xml" "${extra[@]}"
}

stage_demo() {
  cd "$RUN" || exit 1
  local extra=()
  [ "$REHEARSAL" = 1 ] && extra=(--steps 30 --sgd-steps 10 --n-train 60 --width 16)
  "$PY" -m leakycuda.cli demo --device "$DEVICE" --out "$WORK/demo" --no-progress "${extra[@]}"
}

stage_bench_stack() {
  cd "$RUN" || exit 1
  local extra=()
  [ "$REHEARSAL" = 1 ] && extra=(--tiny --reps 2)
  "$PY" "$REPO/bench/bench_stack_cuda.py" --device "$DEVICE" --no-compile \
    --only L20_tf32,L20_fp32_exact,paper_tf32,paper_fp32_exact,models16_L20_tf32 \
    --out "$WORK/json/bench_stack_cuda.json" "${extra[@]}"
}

stage_bench_energies() {
  cd "$RUN" || exit 1
  local sizes=500,1000,100 repeats=3
  [ "$REHEARSAL" = 1 ] && sizes=4,30,6 repeats=1
  "$PY" "$REPO/bench/bench_energies.py" --device "$DEVICE" --sizes "$sizes" --repeats "$repeats" \
    --out "$WORK/json/bench_energies.json"
}

stage_bench_ensemble() {
  cd "$RUN" || exit 1
  local extra=(--repeats 40)
  [ "$REHEARSAL" = 1 ] && extra=(--tiny --repeats 2)
  "$PY" "$REPO/bench/bench_ensemble.py" --device "$DEVICE" --skip-fig1 --out "$WORK/json/bench_ensemble.json" \
    "${extra[@]}"
}

# --- running them --------------------------------------------------------------------------------------------

pack() {
  # summary.txt / summary.json from the stage table and the JSON files, then every log and JSON in one tarball
  if ! "$PY" "$REPO/bench/gpu_check_summary.py" "$WORK" "$OUT/summary.json" > "$OUT/summary.txt" 2> "$WORK/logs/summary.err"; then
    { echo "gpu_check_summary.py failed (logs/summary.err); the stage table:"; cat "$WORK/stages.tsv"; } > "$OUT/summary.txt"
  fi
  for f in "$WORK"/logs/*.log; do  # keep each log's end if one grew huge
    [ -f "$f" ] && [ "$(wc -c < "$f")" -gt 4000000 ] && { tail -c 4000000 "$f" > "$f.tail" && mv "$f.tail" "$f"; }
  done
  cp "$OUT/summary.txt" "$WORK/summary.txt" 2>/dev/null
  tar czf "$OUT/gpu_check.tar.gz.part" -C "$WORK" . 2>/dev/null && mv "$OUT/gpu_check.tar.gz.part" "$OUT/gpu_check.tar.gz"
}

record() {  # stage status rc seconds limit note
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/stages.tsv"
}

build_failed=0
run_stage() {
  local name=$1 fn left limit t0 t1 rc status secs
  fn=stage_${name//-/_}
  left=$((DEADLINE - $(date +%s) - RESERVE_S))
  limit=${CAP[$name]}
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$build_failed" = 1 ] && [ "$name" != env ]; then
    record "$name" skipped "" 0 "$limit" "the build failed"
    echo "== $name: skipped (the build failed)"
    return
  fi
  if [ "$left" -lt "$MIN_STAGE_S" ] || [ "$limit" -lt 1 ]; then
    record "$name" skipped "" 0 "$limit" "out of time (budget ${BUDGET_S}s)"
    echo "== $name: skipped (out of time)"
    return
  fi
  echo "== $name (limit ${limit}s)"
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" bash -c "$(declare -f "$fn"); set -o pipefail; $fn" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$rc" "$secs" "$limit" ""
  echo "   $status (rc $rc) in ${secs}s; log tail:"
  tail -n 4 "$WORK/logs/$name.log" | cut -c1-200 | sed 's/^/   | /'
  if [ "$name" = build ] && [ "$status" != ok ]; then
    build_failed=1
  fi
  pack
}

trap 'exit 143' TERM INT
finish() {
  pack
  cat "$OUT/summary.txt"
  [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
}
trap finish EXIT
echo "gpu_check: device $DEVICE, commit $COMMIT, fingerprint $FINGERPRINT, budget ${BUDGET_S}s, $PY = $(command -v "$PY"), work $WORK"
for st in "${selected[@]}"; do
  run_stage "$st"
done
fails=$(awk -F'\t' 'NR > 1 && $2 != "ok" { n++ } END { print n + 0 }' "$WORK/stages.tsv")
files=("$OUT"/*)
echo "== done in $(( $(date +%s) - START ))s, $fails stage(s) not ok; files in $OUT: ${files[*]##*/}"
exit $(( fails > 0 ))
