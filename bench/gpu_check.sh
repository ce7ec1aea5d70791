#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (one H100 or H200; torch 2.11, Python 3.12 there,
# no megatron-core: its wheel travels in .whl/). In under 8 minutes it
#   1. runs the GPU-marked tests (CUDA kernels, pinned offload with the side stream, fpdt_attention on CUDA);
#   2. measures FPDT against the baseline on a Llama-3.2-1B-shaped model: step time, MFU and peak device
#      memory at 32K, 64K, 128K tokens and beyond until the baseline runs out of memory, then the longest
#      FPDT sequence reached in the time left (bench/gpu_sweep.py).
# Results land under $OUT (the device tool brings them back); copy the tables, with the card's name,
# into docs/BENCHMARKS.md.
#
#   here, once:      bash bench/gpu_check.sh --prepare          # megatron-core's wheel for Python 3.12 -> .whl/
#   on the device:   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "megatron-core==0.16.1"
fi

OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-470}
START=$(date +%s)
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "no megatron-core wheel: run 'bash bench/gpu_check.sh --prepare' here first"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, megatron.core; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)" \
    | tee -a "$OUT/gpu.txt"

echo "== 1/2 GPU tests"
timeout 180 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py tests/test_offload.py tests/test_disk.py \
    tests/test_gpu_attention.py 2>&1 | tee "$OUT/gpu_tests.log"

echo "== 2/2 FPDT vs baseline, Llama-3.2-1B shape"
LEFT=$((BUDGET_S - ($(date +%s) - START)))
python3 bench/gpu_sweep.py --model llama3.2-1b --start 32768 --chunk-size 16384 --budget-s "$LEFT" \
    --out "$OUT/gpu_sweep.json" 2>&1 | grep -v -i warn | tee "$OUT/gpu_sweep.log"
echo "total $(( $(date +%s) - START )) s"
