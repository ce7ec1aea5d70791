#!/usr/bin/env bash
# Llama-3-8B with FPDT at 2M tokens on 4 GPUs (one node): the FPDT paper's headline setup.
# tools/memory_planner.py --use-torch-fsdp2: 58.3 GiB per 80 GB GPU at 2M tokens (longest 3.5M),
# 146 GiB of host memory per GPU. The model state is sharded over the 4 GPUs with FSDP2
# (--use-torch-fsdp2, as the paper's ZeRO-3); without it the model state alone takes ~67 GiB
# and 2M tokens do not fit 80 GB (USE_FSDP=0 goes back to the distributed optimizer).
#   FPDT size 4 (each GPU holds 512K tokens), 32 chunks of 64K tokens, offload on,
#   full recompute with the checkpointed layer inputs in host memory.
# Untested on GPU: FSDP2 and FPDT together ran on the CPU only (tests/distributed/test_sharding.py).
#
#   DATA_PATH=/data/corpus_text_document TOKENIZER_MODEL=/models/Meta-Llama-3-8B \
#       examples/llama3_8b_fpdt_2m_4gpu.sh
#   DRY_RUN=1 examples/llama3_8b_fpdt_2m_4gpu.sh      # validate everything, no GPU needed
#
# Environment overrides: GPUS_PER_NODE, SEQ_LENGTH, CHUNK_SIZE, TRAIN_ITERS, GLOBAL_BATCH,
# DATA_PATH (default: mock data), TOKENIZER_TYPE, TOKENIZER_MODEL, SAVE, PYTHON, DRY_RUN, USE_FSDP.
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
USE_FSDP=${USE_FSDP:-1}

MODEL_ARGS=(
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
    --num-attention-heads 32 --group-query-attention --num-query-groups 8
    --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
    --rotary-base 500000 --norm-epsilon 1e-5
)
PARALLEL_ARGS=(
    --tensor-model-parallel-size 1
    --fpdt --fpdt-parallel-size "$GPUS_PER_NODE" --fpdt-chunk-size "$CHUNK_SIZE" --fpdt-offload
)
if [[ "$USE_FSDP" == 1 ]]; then PARALLEL_ARGS+=(--use-torch-fsdp2); else PARALLEL_ARGS+=(--use-distributed-optimizer); fi
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
