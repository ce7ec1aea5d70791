#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (one H100 or H200: torch 2.11 + CUDA 13, Python 3.12,
# pytest and numpy there; no megatron-core, flash-attn, TE or apex, no network). From a clean clone
# plus the wheel prepared here, it yields in at most ~8 minutes, phase by phase (bench/gpu_check.py
# says what each measures), every phase under its own timeout, results appended to
# $OUT/results.jsonl as they are produced, so a late failure still leaves the early results:
#
#   env, ceilings (bf16 matmul TFLOP/s, pinned H2D/D2H GB/s), the GPU-marked tests, kernel probe
#   at Llama-3.2-1B's attention shape vs float64, fpdt_attention vs SDPA at 32K (bf16), offload
#   under load, the training sweep (FPDT vs baseline, 32K/64K/128K, then FPDT further), and the
#   projection of FPDT's longest sequence (with the planner's recalibration).
#
#   here, once:     bash bench/gpu_check.sh --prepare      # megatron-core's wheel for Python 3.12 -> .whl/
#   on the device:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
#   CPU dry run:    bash bench/gpu_check.sh --dry-run      # every phase at tiny shapes (the test suite does this)
#
# Copy what results.jsonl says, with the card's name, into docs/BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-}
if [[ "$MODE" == "--prepare" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "megatron-core==0.16.1" "einops"
fi

PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [[ "$MODE" == "--dry-run" ]]; then
    TINY=--tiny
    OUT=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
    BUDGET_S=${BUDGET_S:-240}
    SWEEP_MAX_S=${SWEEP_MAX_S:-90}
else
    TINY=
    OUT=${OUT:-out/gpu_check}
    BUDGET_S=${BUDGET_S:-470}
    SWEEP_MAX_S=${SWEEP_MAX_S:-300}
fi
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
LOG="$OUT/check.log"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

if ! "$PYTHON" -c "import megatron.core" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "no megatron-core: run 'bash bench/gpu_check.sh --prepare' here first and carry .whl"; exit 1; }
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"

# phase NAME TIMEOUT_S COMMAND...: run under its timeout, log it, and record how it ended
phase() {
    local name=$1 limit=$2; shift 2
    local t0 rc
    t0=$(date +%s)
    echo "== $name (at $(elapsed) s, limit ${limit} s)" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | grep -v -i 'warn' | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "{\"phase\": \"$name\", \"exit\": $rc, \"timed_out\": $([[ $rc == 124 || $rc == 137 ]] && echo true || echo false), \"seconds\": $(( $(date +%s) - t0 ))}" >> "$RESULTS"
}
check() { phase "$1" "$2" "$PYTHON" bench/gpu_check.py "$1" --jsonl "$RESULTS" $TINY "${@:3}"; }

check env 60
check ceilings 60
phase tests 210 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --timeout 90 -o addopts= \
    tests/unit/test_kernels.py tests/unit/test_offload.py tests/unit/test_disk.py tests/unit/test_gpu_attention.py tests/e2e/test_gpu_training.py
check kernels 90
check attention 90
check offload 60
LEFT=$(( BUDGET_S - $(elapsed) - 30 ))
SWEEP=$(( LEFT < SWEEP_MAX_S ? LEFT : SWEEP_MAX_S ))
(( SWEEP < 30 )) && SWEEP=30
check sweep $(( SWEEP + 30 )) --budget-s "$SWEEP"
check projection 30
echo "total $(elapsed) s; results in $RESULTS" | tee -a "$LOG"
