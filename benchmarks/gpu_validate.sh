#!/usr/bin/env bash
# One prepared validation run of the kernels on a GPU machine, <= 8 minutes, at most 8 files:
#   env.txt        GPU, driver, versions
#   build.log      CUDA extension build (pip install -e . --no-build-isolation; fallback setup.py build_ext --inplace)
#   pytest.log     the `gpu` tests, compiled kernels (TRITON_INTERPRET unset)
#   checks.json    benchmarks/gpu_checks.py: ragged sizes, strides, poisoned outputs, ranks 1..256,
#                  offsets past int32, several tiles per program, CUDA extension, second device
#   checks.log     its console output
#   bench_ops.json benchmarks/bench_ops.py at the goal shapes (L2 flushed, bytes / bandwidth / FLOP fractions)
#   bench.log      its console output
#   summary.txt    exit status and seconds of every step
#
#   benchmarks/gpu_validate.sh [OUT_DIR]            # on the GPU machine
#   benchmarks/gpu_validate.sh --dry-run OUT_DIR    # on a CPU: interpreter, tiny shapes, no build (CI runs this)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:-benchmarks/results/gpu_validate_$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

step() {  # step NAME TIMEOUT_S LOG COMMAND...: run with a time limit, record status and seconds
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" >> "$SUMMARY"
  if [ "$rc" -ne 0 ]; then FAILED=1; fi
  return 0
}

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  TINY=--tiny
else
  unset TRITON_INTERPRET  # CUDA tensors must run compiled kernels
  TINY=
fi
echo "mode=$([ "$DRY" = 1 ] && echo dry-run || echo gpu) started=$(date -u +%FT%TZ)" >> "$SUMMARY"

{
  date -u +%FT%TZ
  uname -a
  (command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv) || echo "no nvidia-smi"
  (command -v nvcc > /dev/null && nvcc --version | tail -2) || echo "no nvcc"
  "$PY" -c "import sys, torch, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'gpus', torch.cuda.device_count())"
  "$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton not importable"
} > "$OUT/env.txt" 2>&1

if [ "$DRY" = 1 ]; then
  echo "dry run: extension build skipped" > "$OUT/build.log"
  echo "build rc=skipped" >> "$SUMMARY"
else
  build() {
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
    "$PY" -m pip install -q -e . --no-build-isolation && "$PY" -c "import moe_unlearn._C" && return 0
    echo "pip build failed; trying setup.py build_ext --inplace"
    "$PY" setup.py build_ext --inplace && "$PY" -c "import moe_unlearn._C"
  }
  step build 240 "$OUT/build.log" bash -c "$(declare -f build); PY='$PY'; build"
fi

step pytest 120 "$OUT/pytest.log" "$PY" -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_ops_loramoe_delta.py tests/test_ops_routing_stats.py
step checks 150 "$OUT/checks.log" "$PY" benchmarks/gpu_checks.py --out "$OUT/checks.json" $TINY
step bench 240 "$OUT/bench.log" "$PY" benchmarks/bench_ops.py --out "$OUT/bench_ops.json" $TINY

echo "finished=$(date -u +%FT%TZ) failed=$FAILED" >> "$SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
