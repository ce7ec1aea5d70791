#!/usr/bin/env bash
# Llama-3-8B with FPDT at 2M tokens on 4 GPUs (one node): the FPDT paper's headline setup.
# tools/memory_planner.py: fits 141 GB GPUs (H200); on 80 GB GPUs the model state alone takes
# ~71 GB (the paper shards it with ZeRO-3) and the longest sequence is 589824 tokens.
#   FPDT size 4 (each GPU holds 512K tokens), 32 chunks of 64K tokens, offload on,
#   full recompute with the checkpointed layer inputs in host memory, distributed optimizer.
#
#   DATA_PATH=/data/corpus_text_document TOKENIZER_MODEL=/models/Meta-Llama-3-8B \
#       examples/llama3_8b_fpdt_2m_4gpu.sh
#   DRY_RUN=1 examples/llama3_8b_fpdt_2m_4gpu.sh      # validate everything, no GPU needed
#
# Environment overrides: GPUS_PER_NODE, SEQ_LENGTH, CHUNK_SIZE, TRAIN_ITERS, GLOBAL_BATCH,
# DATA_PATH (default: mock data), TOKENIZER_TYPE, TOKENIZER_MODEL, SAVE, PYTHON, DRY_RUN.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
SEQ_LENGTH=${SEQ_LENGTH:-2097152}
CHUNK_SIZE=${CHUNK_SIZE:-65536}
TRAIN_ITERS=${TRAIN_ITERS:-100}
GLOBAL_BATCH=${GLOBAL_BATCH:-1}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-HuggingFaceTokenizer}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-/models/Meta-Llama-3-8B}
SAVE=${SAVE:-runs/llama3_8b_fpdt_2m}

MODEL_ARGS=(
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
    --num-attention-heads 32 --group-query-attention --num-query-groups 8
    --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
    --rotary-base 500000 --norm-epsilon 1e-5
)
PARALLEL_ARGS=(
    --tensor-model-parallel-size 1
    --fpdt --fpdt-parallel-size "$GPUS_PER_NODE" --fpdt-chunk-size "$CHUNK_SIZE" --fpdt-offload
    --use-distributed-optimizer
)
TRAINING_ARGS=(
    --micro-batch-size 1 --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS" --bf16
    --lr 3e-5 --min-lr 3e-6 --lr-warmup-iters 10 --lr-decay-style cosine
    --clip-grad 1.0 --weight-decay 0.1 --adam-beta2 0.95
    --recompute-granularity full --offload-recompute-inputs
)
TOKENIZER_ARGS=(--tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL")
if [[ -n "${DATA_PATH:-}" ]]; then DATA_ARGS=(--data-path $DATA_PATH --split 99,1,0); else DATA_ARGS=(--mock-data); fi
LOGGING_ARGS=(--log-interval 1 --eval-interval "$TRAIN_ITERS" --eval-iters 1 --save "$SAVE" --save-interval 50)
ARGS=("${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${TOKENIZER_ARGS[@]}" "${DATA_ARGS[@]}"
      "${LOGGING_ARGS[@]}" "$@")

if [[ -n "${DRY_RUN:-}" ]]; then
    exec "$PYTHON" pretrain_llama.py "${ARGS[@]}" --dry-run --dry-run-world-size "$GPUS_PER_NODE"
fi
exec "$PYTHON" -m torch.distributed.run --nproc-per-node "$GPUS_PER_NODE" pretrain_llama.py "${ARGS[@]}"
