#!/usr/bin/env bash
# FPDT training on the CPU: a small Llama-style model, 2 processes, FPDT size 2,
# chunked attention/MLP/loss with offload and full recompute, mock data.
# Every setting can be overridden from the environment, e.g. SEQ_LENGTH=4096 ITERS=50.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
NPROC=${NPROC:-2}
SEQ_LENGTH=${SEQ_LENGTH:-2048}
CHUNK_SIZE=${CHUNK_SIZE:-512}
ITERS=${ITERS:-30}

MODEL_ARGS=(
    --num-layers 2 --hidden-size 128 --ffn-hidden-size 344
    --num-attention-heads 4 --group-query-attention --num-query-groups 2
    --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
)
PARALLEL_ARGS=(
    --fpdt --fpdt-parallel-size "$NPROC" --fpdt-chunk-size "$CHUNK_SIZE" --fpdt-offload
)
TRAINING_ARGS=(
    --micro-batch-size 1 --global-batch-size 2 --train-iters "$ITERS"
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 3 --lr-decay-style cosine
    --clip-grad 1.0 --weight-decay 0.1 --seed 1234
    --recompute-granularity full --offload-recompute-inputs
)
DATA_ARGS=(--mock-data --vocab-size 512)
LOGGING_ARGS=(--log-interval 5 --eval-interval "$ITERS" --eval-iters 1)

exec "$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" pretrain_llama.py \
    "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
