#!/usr/bin/env bash
# The GPU check, one prepared call on a lent H100/H200 (no network; its python3 has torch, triton, nvcc,
# ninja, pytest-benchmark): build the CUDA extension, run the CUDA and Triton tests, compute-sanitizer
# memcheck on a short parity run, then the benchmarks and their report. Everything lands in $1:
#   summary.txt build.log tests.log sanitizer.log bench.log bench.json report.md report.png
# Each stage has its own time limit so the whole script stays under 8 minutes; a failing stage is recorded
# in summary.txt and the next one still runs. Exit status: the number of failed stages.
#   usage: bench/device_check.sh OUT_DIR
set -uo pipefail
OUT=${1:?usage: bench/device_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
FAILED=0
T0=$SECONDS
BUDGET=${DEVICE_CHECK_BUDGET:-460}  # seconds for the whole script: each stage gets at most what is left
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

stage() {  # stage NAME LOG SECONDS COMMAND...
  local name=$1 log=$2 limit=$3 start=$SECONDS rc=0 left=$((BUDGET - (SECONDS - T0)))
  shift 3
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 10 ]; then FAILED=$((FAILED + 1)); summary "$name: not run, the time budget is spent"; return 0; fi
  echo "::: $name" >>"$OUT/$log"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1 || rc=$?
  [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
  summary "$name: rc=$rc in $((SECONDS - start)) s (limit $limit s, total $((SECONDS - T0)) s; log $log)"
  return 0
}

summary "device_check $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1)"
summary "git $(git rev-parse --short HEAD 2>/dev/null || echo '?')  $($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>&1)"

stage "build" build.log 200 env FORCE_CUDA=1 $PY -m pip install -v --no-build-isolation --no-deps --no-index -e .
stage "info" build.log 30 $PY -m skelemix.info
# GPU tests: everything marked for CUDA or Triton, run on the device (not the CPU interpreter).
stage "tests" tests.log 120 env SKELEMIX_REQUIRE_CUDA_BUILD=1 $PY -m pytest -q -p no:cacheprovider tests \
  -m "needs_cuda or needs_triton or triton_interpret" -x --timeout=120
if command -v compute-sanitizer >/dev/null; then
  stage "compute-sanitizer memcheck" sanitizer.log 90 compute-sanitizer --tool memcheck --error-exitcode 9 \
    --target-processes all $PY -m bench.gpu_parity --impl cuda
else
  summary "compute-sanitizer: not on PATH, skipped"
fi
stage "gpu parity (fp32, bf16)" sanitizer.log 60 $PY -m bench.gpu_parity --impl cuda triton --dtype float32 bfloat16
# Most important first, so that a run cut short by its limit still has the end-to-end numbers.
stage "benchmarks" bench.log 200 env SKELEMIX_BENCH_JSON="$OUT/bench.json" $PY -m pytest -q -p no:cacheprovider \
  bench/bench_machine.py bench/bench_model.py bench/bench_mask_pool.py bench/bench_skelemix_gather.py \
  bench/bench_graph_conv.py bench/bench_bn_epilogue.py bench/bench_data.py \
  --benchmark-columns=median,min,rounds
if [ -f "$OUT/bench.json" ]; then
  stage "report" bench.log 30 $PY -m bench.report "$OUT/bench.json" --markdown "$OUT/report.md" --png "$OUT/report.png"
fi
summary "done: $FAILED failed stage(s) in $((SECONDS - T0)) s"
exit "$FAILED"
