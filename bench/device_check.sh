#!/usr/bin/env bash
# The GPU check, one prepared call on a lent H100/H200 (no network; its python3 has torch, triton, nvcc,
# ninja, pytest-benchmark): build the CUDA extension, self-check every kernel (python -m skelemix.info --check),
# run the tests that need the device (parity first, then the long Inductor and CUDA-graph ones),
# compute-sanitizer memcheck on a short parity run, the Triton parity run, then the benchmarks (the
# SkeleMixCLR+ step matrix most useful row first, compile rows last) and their report.
# Everything lands in OUT_DIR, at most 8 files (what the device tool brings back):
#   summary.txt build.log tests.log parity.log bench.log bench.json steps.md report.md
# The whole script stays within DEVICE_CHECK_BUDGET seconds (default 460, under 8 minutes): each stage gets a
# share of it (the benchmarks also what earlier stages left) and is cut by `timeout`; a failing or cut stage
# is recorded in summary.txt and the next one still runs. Exit status: the number of failed stages.
#
# --dry-run runs every stage at tiny sizes on the CPU (no CUDA build, no sanitizer; the device tests are
# collected and skip), so CI keeps the script from rotting.
#   usage: bench/device_check.sh [--dry-run] OUT_DIR
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: bench/device_check.sh [--dry-run] OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${DEVICE_CHECK_BUDGET:-460}
GRACE=3  # seconds `timeout` waits after TERM before KILL; taken out of each stage's limit
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# Passing self-checks are cached here, not in the machine's home (and not in OUT: only 8 files come back).
SKELEMIX_CACHE_DIR=$(mktemp -d)
export SKELEMIX_CACHE_DIR
trap 'rm -rf "$SKELEMIX_CACHE_DIR"' EXIT
if [ "$DRY" -eq 1 ]; then
  # The CPU alone, tiny sizes, one round, one thread (OpenMP threads that wait on each other crawl on a busy
  # CI machine: 10 s instead of 0.2 s for a tiny step), Dynamo without Inductor.
  export CUDA_VISIBLE_DEVICES="" SKELEMIX_BENCH_SIZE=tiny SKELEMIX_BENCH_COMPILE_BACKEND=eager OMP_NUM_THREADS=1
fi
FAILED=0
T0=$SECONDS
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
left() { echo $((BUDGET - (SECONDS - T0))); }

stage() {  # stage NAME LOG SECONDS COMMAND...: run COMMAND with at most SECONDS (and what is left), logged
  local name=$1 log=$2 limit=$3 start=$SECONDS rc=0
  shift 3
  [ "$limit" -le "$(left)" ] || limit=$(left)
  limit=$((limit - GRACE))
  if [ "$limit" -lt 5 ]; then
    FAILED=$((FAILED + 1)); summary "$name: not run, $(left) s left of the $BUDGET s budget"; return 0
  fi
  echo "::: $name (limit $limit s)" >>"$OUT/$log"
  timeout --kill-after=$GRACE "$limit" "$@" >>"$OUT/$log" 2>&1 || rc=$?
  [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
  local why=""
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why=" CUT at its limit"
  summary "$name: rc=$rc$why in $((SECONDS - start)) s (limit $limit s, total $((SECONDS - T0)) s; log $log)"
  return 0
}

skip() { summary "$1: skipped ($2)"; }
share() { echo $((BUDGET * $1 / 100)); }  # share PERCENT: that part of the budget, in seconds

# pytest as a word list (unquoted on purpose), with a per-test limit where pytest-timeout is installed: a hung
# test must not eat its stage.
PYTEST="-m pytest -q -p no:cacheprovider -rfEs"
if $PY -c "import pytest_timeout" 2>/dev/null; then PYTEST="$PYTEST --timeout=90"; fi

tests_parity() {  # the CUDA build must have loaded, then every kernel against the reference on the device
  local rc=0
  env SKELEMIX_REQUIRE_CUDA_BUILD=$((1 - DRY)) $PY $PYTEST tests/test_extension.py::test_ci_requires_cuda_build || rc=$?
  $PY $PYTEST --maxfail=10 -m needs_cuda -k "not compile and not graph_capture" tests/test_selfcheck.py $OP_TESTS \
    || rc=$?
  return $rc
}

tests_long() {  # CUDA-graph training (train.cuda_graph), then the ops' compile (Inductor for Triton) and capture tests
  local rc=0
  $PY $PYTEST --maxfail=5 -m needs_cuda tests/test_cuda_graph.py || rc=$?
  $PY $PYTEST --maxfail=5 -m needs_cuda -k "compile or graph_capture" $OP_TESTS || rc=$?
  return $rc
}
# Every implementation of an op (cpp, cuda, triton) is a parameter of its tests: the device's cases are marked
# needs_cuda.
OP_TESTS="tests/test_graph_conv.py tests/test_mask_pool.py tests/test_skelemix_gather.py tests/test_bn_epilogue.py"
export -f tests_parity tests_long
export PY PYTEST DRY OP_TESTS

GPU=$(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -1)
summary "device_check $(date -u +%FT%TZ)$([ "$DRY" -eq 1 ] && echo ' DRY RUN (CPU, tiny sizes)') on ${GPU:-no GPU}"
summary "git $(git rev-parse --short HEAD 2>/dev/null || echo '?')  $($PY -c 'import torch; print("torch", torch.__version__)' 2>&1) $($PY -c 'import triton; print("triton", triton.__version__)' 2>&1 | tail -1)"

# Shares of the budget in percent: 97 here (report included), and the compile rows get the rest. What a stage leaves unused
# goes to the step matrix (beyond 10% kept for the compile rows) and then to the compile rows.
if [ "$DRY" -eq 1 ]; then
  skip "build" "dry run"
else
  stage "build" build.log "$(share 30)" env FORCE_CUDA=1 $PY -m pip install -v --no-build-isolation --no-deps \
    --no-index -e .
fi
stage "info and self-check" build.log "$(share 10)" $PY -m skelemix.info --check
stage "tests: CUDA build, parity" tests.log "$(share 12)" bash -c tests_parity
if [ "$DRY" -eq 1 ]; then
  skip "compute-sanitizer memcheck" "dry run"
elif command -v compute-sanitizer >/dev/null; then
  # Without the caching allocator every tensor is its own allocation, so an out-of-bounds access of a small
  # tensor is caught instead of landing in a valid 2 MiB segment.
  stage "compute-sanitizer memcheck" parity.log "$(share 7)" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 9 --target-processes all $PY -m bench.gpu_parity --impl cuda
else
  skip "compute-sanitizer memcheck" "not on PATH"
fi
if [ "$DRY" -eq 1 ]; then
  stage "parity (fp32, bf16)" parity.log "$(share 5)" $PY -m bench.gpu_parity --device cpu --impl cpp \
    --dtype float32 bfloat16
else
  stage "parity (fp32, bf16)" parity.log "$(share 5)" $PY -m bench.gpu_parity --impl cuda triton \
    --dtype float32 bfloat16
fi
stage "tests: CUDA graphs, Inductor" tests.log "$(share 7)" bash -c tests_long

# Benchmarks, into one JSON: the machine's peaks and the step matrix without compile rows; graph_conv's Triton
# settings (fixed config vs autotuned, reduction programs per SM); then, with whatever time is left, the
# compile rows (a cold Inductor compile each). steps.md is rewritten after every step row.
rm -f "$OUT/bench.json"
BENCH=(env SKELEMIX_BENCH_JSON="$OUT/bench.json" SKELEMIX_BENCH_APPEND=1 $PY $PYTEST --benchmark-columns=median,rounds)
if [ "$DRY" -eq 1 ]; then
  # The code paths, not the numbers: the official-style and the baseline rows, one row with the compiled ops,
  # the fused epilogue and bf16, and one compile row (Dynamo's trace only).
  MATRIX_ROWS=(bench/bench_machine.py "bench/bench_model.py::test_training_step[official-style-modules-none-off]"
               "bench/bench_model.py::test_training_step[eager-modules-none-off]"
               "bench/bench_model.py::test_training_step[cpp-fused-bf16-off]")
  COMPILE_ROWS=("bench/bench_model.py::test_training_step[compile-modules-none-off]")
else
  MATRIX_ROWS=(bench/bench_machine.py bench/bench_model.py -k "test_copy or test_matmul or (training_step and not compile)")
  COMPILE_ROWS=(bench/bench_model.py -k "training_step and compile")
fi
# The step matrix may also use what earlier stages left, beyond what the later ones need at least.
MATRIX_LIMIT=$(($(left) - $(share 4) - $(share 10) - $(share 4)))
[ "$MATRIX_LIMIT" -ge "$(share 18)" ] || MATRIX_LIMIT=$(share 18)
stage "benchmarks: machine, step matrix" bench.log "$MATRIX_LIMIT" "${BENCH[@]}" "${MATRIX_ROWS[@]}"
stage "benchmarks: graph_conv Triton settings" bench.log "$(share 4)" "${BENCH[@]}" bench/bench_graph_conv.py \
  -k "triton_settings"
REPORT_RESERVE=$(share 4)
stage "benchmarks: compile rows" bench.log $(($(left) - REPORT_RESERVE)) "${BENCH[@]}" "${COMPILE_ROWS[@]}"
if [ -f "$OUT/bench.json" ]; then
  stage "report" bench.log "$REPORT_RESERVE" $PY -m bench.report "$OUT/bench.json" --markdown "$OUT/report.md"
else
  FAILED=$((FAILED + 1))
  summary "report: no bench.json (no benchmark finished)"
fi
summary "done: $FAILED failed stage(s) in $((SECONDS - T0)) s (budget $BUDGET s)"
exit "$FAILED"
