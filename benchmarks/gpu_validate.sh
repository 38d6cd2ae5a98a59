#!/usr/bin/env bash
# One prepared validation run of the kernels on a lent GPU machine (offline: no network, no package index).
#
#   benchmarks/gpu_validate.sh OUT_DIR              # on the GPU machine; every file goes to OUT_DIR
#   benchmarks/gpu_validate.sh --dry-run OUT_DIR    # on a CPU: same steps, interpreter, tiny shapes, pip --dry-run
#   GV_DRY_PARALLEL=1 benchmarks/gpu_validate.sh --dry-run OUT_DIR   # ... with install, checks, bench side by side
#
# Steps, each under its own `timeout` (GPU limits sum to 465 s <= 480 s, so one command of <= 600 s fits):
#   preflight  versions (python, torch, CUDA, Triton, numpy, transformers, nvcc, GPU), what is missing, and the
#              plan: every step, limit and row it will run -> env.txt (a failed preflight stops the run)
#   install    pip install --no-deps --no-build-isolation -e . with PIP_NO_INDEX=1 (no CUDA extension: opt-in);
#              whatever pip does, PYTHONPATH=<repo root> makes the checkout importable without it   -> install.log
#   checks     benchmarks/gpu_checks.py: gradient values at the headline shapes, routing counts on tie-free
#              logits (fp32/bf16, top-4/top-8), ragged sizes, strides, poisoned outputs, ranks, int32 offsets
#              -> checks.json (rewritten after every row), checks.log
#   bench      benchmarks/bench_ops.py at the goal shapes (L2 flushed; bytes, bandwidth and FLOP fractions;
#              fwd+bwd gradients checked against the fp32 torch reference) -> bench_ops.json (after every row), bench.log
# summary.txt: exit status, seconds and limit of every step. The checks and the benchmark also stop starting
# rows when their own time budget is spent (recorded as skipped), so a slow compile never loses the file.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DRY=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "gpu_validate.sh: unknown option $arg" >&2; exit 2 ;;
    *) if [ -n "$OUT" ]; then echo "gpu_validate.sh: one OUT_DIR only" >&2; exit 2; fi; OUT="$arg" ;;
  esac
done
if [ -z "$OUT" ]; then
  echo "usage: benchmarks/gpu_validate.sh [--dry-run] OUT_DIR   (results go to OUT_DIR, the folder that comes back)" >&2
  exit 2
fi
mkdir -p "$OUT" || { echo "gpu_validate.sh: cannot create $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if ! command -v "$PY" > /dev/null; then PY=python3; fi

# Offline like the GPU machine: no index, no version check; the checkout is importable without any install.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_FIND_LINKS=""
export PIP_INDEX_URL="http://127.0.0.1:9/nowhere"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  TINY=--tiny
else
  unset TRITON_INTERPRET  # CUDA tensors must run compiled kernels
  TINY=
fi

# name limit_s budget_s (budget: what the python step plans its rows against, below the hard limit). These
# are the GPU run's limits; the dry run multiplies them by GV_DRY_LIMIT_SCALE (default 3): the interpreter on
# a shared CPU is no measure of the GPU's time, and the dry run must not fail for a busy machine.
STEPS=("preflight 40 0" "install 40 0" "checks 185 165" "bench 200 180")
SCALE=1
if [ "$DRY" = 1 ]; then SCALE="${GV_DRY_LIMIT_SCALE:-3}"; fi
STEP_LIMIT_TOTAL=0
for s in "${STEPS[@]}"; do set -- $s; STEP_LIMIT_TOTAL=$((STEP_LIMIT_TOTAL + $2)); done
gpu_limit() { local want=$1; for s in "${STEPS[@]}"; do set -- $s; [ "$1" = "$want" ] && { echo "$2"; return; }; done; }
limit() { echo $(( $(gpu_limit "$1") * SCALE )); }
budget() { local want=$1; for s in "${STEPS[@]}"; do set -- $s; [ "$1" = "$want" ] && { echo $(($3 * SCALE)); return; }; done; }

SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
echo "mode=$([ "$DRY" = 1 ] && echo dry-run || echo gpu) started=$(date -u +%FT%TZ) gpu_step_limits_total=$STEP_LIMIT_TOTAL limit_scale=$SCALE" >> "$SUMMARY"

export PY DRY TINY ROOT SCALE STEP_LIMIT_TOTAL STEPS_TEXT="${STEPS[*]}"
step() {  # step NAME LOG COMMAND...: run under the step's limit, record status, seconds and limit
  local name=$1 log=$2; shift 2
  local lim; lim=$(limit "$name")
  local t0=$SECONDS
  if declare -F "$1" > /dev/null; then  # a shell function runs in a child bash (timeout needs a program)
    set -- bash -c "$(declare -f "$1"); $1"
  fi
  timeout --kill-after=5 "$lim" "$@" > "$log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0)) limit=$lim gpu_limit=$(gpu_limit "$name")" >> "$SUMMARY"
  [ "$rc" -ne 0 ] && FAILED=1
  return 0
}

preflight() {
  date -u +%FT%TZ
  uname -srm
  (command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv) \
    || echo "nvidia-smi: none"
  (command -v nvcc > /dev/null && nvcc --version | tail -1) || echo "nvcc: none"
  echo "plan ($([ "$DRY" = 1 ] && echo dry-run || echo gpu)); GPU step limits sum to $STEP_LIMIT_TOTAL s (x$SCALE here)"
  printf '%s %s %s\n' $STEPS_TEXT | while read -r n l b; do echo "  step $n: limit $l s, row budget $b s (x$SCALE)"; done
  "$PY" benchmarks/gpu_checks.py --preflight $TINY  # versions, problems (exit 1), the checks and bench rows
}
step preflight "$OUT/env.txt" preflight
cat "$OUT/env.txt"
if ! grep -q "^preflight rc=0" "$SUMMARY"; then
  echo "finished=$(date -u +%FT%TZ) failed=1 (preflight failed: see env.txt)" >> "$SUMMARY"
  cat "$SUMMARY"
  exit 1
fi

install() {
  if [ "$DRY" = 1 ]; then
    "$PY" -m pip install --dry-run --no-deps --no-build-isolation -e . && echo "install=pip-dry-run"
  else
    "$PY" -m pip install --no-deps --no-build-isolation -e . && echo "install=pip-editable" \
      || echo "pip install failed; using PYTHONPATH=$ROOT (no install needed)"
  fi
  echo "PYTHONPATH=$PYTHONPATH"
  "$PY" -c "import moe_unlearn, moe_unlearn.kernels.loramoe_delta, moe_unlearn.kernels.loramoe_routed, \
moe_unlearn.kernels.routing_stats as m; print('imports ok from', moe_unlearn.__file__)"
}
run_checks() {
  step checks "$OUT/checks.log" "$PY" benchmarks/gpu_checks.py --out "$OUT/checks.json" --budget-s "$(budget checks)" $TINY
}
run_bench() {
  step bench "$OUT/bench.log" "$PY" benchmarks/bench_ops.py --out "$OUT/bench_ops.json" --budget-s "$(budget bench)" $TINY
}
if [ "$DRY" = 1 ] && [ "${GV_DRY_PARALLEL:-0}" = 1 ]; then
  # CPU dry run only: install, checks and bench run side by side (each on its own core; the checkout is
  # importable from PYTHONPATH without the install). Same steps, files, rows and limits; only the order differs.
  step install "$OUT/install.log" install &
  run_checks &
  run_bench &
  wait
else
  step install "$OUT/install.log" install
  run_checks
  run_bench
fi
# A step that failed in a background job cannot set FAILED: read every status back from the summary.
if grep -Eq '^[a-z]+ rc=[1-9]' "$SUMMARY"; then FAILED=1; fi

echo "finished=$(date -u +%FT%TZ) failed=$FAILED" >> "$SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
