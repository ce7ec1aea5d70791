#!/usr/bin/env bash
# GPT 2.7B (32 layers, hidden 2560, 32 heads) with FPDT at 2M tokens on 4 GPUs (one node),
# GPT-2 BPE tokenizer, LayerNorm, GeLU, biases, tied embeddings, and rotary positions (a learned
# table for 2M positions would alone hold 5.4B parameters).
#
#   DATA_PATH=/data/corpus_text_document VOCAB_FILE=gpt2/vocab.json MERGE_FILE=gpt2/merges.txt \
#       examples/gpt_2.7b_fpdt_2m_4gpu.sh
#   DRY_RUN=1 examples/gpt_2.7b_fpdt_2m_4gpu.sh       # validate everything, no GPU needed
#
# Environment overrides: GPUS_PER_NODE, SEQ_LENGTH, CHUNK_SIZE, TRAIN_ITERS, GLOBAL_BATCH,
# DATA_PATH (default: mock data), VOCAB_FILE, MERGE_FILE, SAVE, PYTHON, DRY_RUN.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
SEQ_LENGTH=${SEQ_LENGTH:-2097152}
CHUNK_SIZE=${CHUNK_SIZE:-65536}
TRAIN_ITERS=${TRAIN_ITERS:-100}
GLOBAL_BATCH=${GLOBAL_BATCH:-1}
VOCAB_FILE=${VOCAB_FILE:-assets/gpt2/vocab.json}
MERGE_FILE=${MERGE_FILE:-assets/gpt2/merges.txt}
SAVE=${SAVE:-runs/gpt_2.7b_fpdt_2m}

MODEL_ARGS=(
    --num-layers 32 --hidden-size 2560 --num-attention-heads 32
    --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
    --position-embedding-type rope --attention-dropout 0 --hidden-dropout 0
)
PARALLEL_ARGS=(
    --tensor-model-parallel-size 1
    --fpdt --fpdt-parallel-size "$GPUS_PER_NODE" --fpdt-chunk-size "$CHUNK_SIZE" --fpdt-offload
    --use-distributed-optimizer
)
TRAINING_ARGS=(
    --micro-batch-size 1 --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS" --bf16
    --lr 1.6e-4 --min-lr 1.6e-5 --lr-warmup-iters 10 --lr-decay-style cosine
    --clip-grad 1.0 --weight-decay 0.1 --adam-beta2 0.95
    --recompute-granularity full --offload-recompute-inputs
)
TOKENIZER_ARGS=(--tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE")
if [[ -n "${DATA_PATH:-}" ]]; then DATA_ARGS=(--data-path $DATA_PATH --split 99,1,0); else DATA_ARGS=(--mock-data); fi
LOGGING_ARGS=(--log-interval 1 --eval-interval "$TRAIN_ITERS" --eval-iters 1 --save "$SAVE" --save-interval 50)
ARGS=("${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${TOKENIZER_ARGS[@]}" "${DATA_ARGS[@]}"
      "${LOGGING_ARGS[@]}" "$@")

if [[ -n "${DRY_RUN:-}" ]]; then
    exec "$PYTHON" pretrain_gpt.py "${ARGS[@]}" --dry-run --dry-run-world-size "$GPUS_PER_NODE"
fi
exec "$PYTHON" -m torch.distributed.run --nproc-per-node "$GPUS_PER_NODE" pretrain_gpt.py "${ARGS[@]}"
