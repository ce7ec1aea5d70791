#!/usr/bin/env bash
# Llama-3.1-8B extended from its 128K context to 1M tokens with FPDT, in two stages, on one node
# of 8 GPUs, and handed back to Hugging Face with a long-context retrieval evaluation.
# Untested on GPU: the same steps run end to end on the CPU at tiny scale in
# tests/e2e/test_context_extension.py; docs/STAGES.md explains each step.
#
#   1. convert in    Hugging Face folder -> our checkpoint (weights only)
#   2. stage 1       262144 tokens, FPDT 8, chunks of 65536, RoPE scaling factor 32 (llama3 type,
#                    original context 8192: 8192 x 32 = 262144)
#   3. stage 2       1048576 tokens from stage 1's weights (--finetune: fresh optimizer and
#                    schedule), chunks of 131072, RoPE scaling factor 128
#   4. convert out   sharded bf16 safetensors + config.json + the tokenizer: from_pretrained loads it
#   5. evaluate      pass-key retrieval at 128K..1M tokens and 5 depths (table + heatmap)
#
# tools/memory_planner.py --preset llama3-8b --gpus 8 --fpdt 8 --gpu-mem-gib 80 --host-mem-gib 1800:
# stage 1 61.3 GiB, stage 2 64.9 GiB of 80 per GPU (fp32 gradient buffer the largest term); host
# 9.1 / 36.5 GiB per GPU for the offloaded layer inputs.
#
#   HF_MODEL=/models/Meta-Llama-3.1-8B DATA_PATH=/data/long_docs_text_document \
#       examples/llama3.1_8b_context_extension.sh
#   DRY_RUN=1 examples/llama3.1_8b_context_extension.sh    # validate every stage, no GPU, no weights
#
# Every step is requeue-safe: a finished step is skipped (conversion) or resumed from its own
# --save (the stages: --finetune resumes from --save when it holds this stage's checkpoints).
# Environment overrides: GPUS_PER_NODE, WORK, HF_MODEL, DATA_PATH (long documents, preprocessed
# with the model's tokenizer; default: mock data), TOKENIZER_TYPE, TOKENIZER_MODEL, STAGE1_ITERS,
# STAGE2_ITERS, EVAL_LENGTHS, PYTHON, DRY_RUN.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
WORK=${WORK:-runs/llama3.1_8b_1m}
HF_MODEL=${HF_MODEL:-/models/Meta-Llama-3.1-8B}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-HuggingFaceTokenizer}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-$HF_MODEL}
STAGE1_ITERS=${STAGE1_ITERS:-200}
STAGE2_ITERS=${STAGE2_ITERS:-100}
EVAL_LENGTHS=${EVAL_LENGTHS:-131072 262144 524288 1048576}

# Llama-3.1-8B's shape (the converter refuses a checkpoint whose config.json differs from it)
MODEL_ARGS=(
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
    --num-attention-heads 32 --group-query-attention --num-query-groups 8
    --rotary-base 500000 --norm-epsilon 1e-5
    --use-rope-scaling --rope-scaling-low-freq-factor 1 --rope-scaling-high-freq-factor 4
    --rope-scaling-original-max-position-embeddings 8192
)
TRAINING_ARGS=(
    --micro-batch-size 1 --global-batch-size 8 --bf16
    --lr 2e-5 --min-lr 2e-6 --lr-warmup-iters 10 --lr-decay-style cosine
    --clip-grad 1.0 --weight-decay 0.1 --adam-beta2 0.95
    --recompute-granularity full --offload-recompute-inputs --use-distributed-optimizer
)
TOKENIZER_ARGS=(--tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL")
if [[ -n "${DATA_PATH:-}" ]]; then DATA_ARGS=(--data-path $DATA_PATH --split 99,1,0); else DATA_ARGS=(--mock-data); fi
COMMON=("${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${TOKENIZER_ARGS[@]}" "${DATA_ARGS[@]}"
        --fpdt --fpdt-parallel-size "$GPUS_PER_NODE" --fpdt-offload --log-interval 1 --eval-iters 1)
STAGE1=(--seq-length 262144 --max-position-embeddings 262144 --fpdt-chunk-size 65536 --rope-scaling-factor 32
        --train-iters "$STAGE1_ITERS" --eval-interval 50 --save "$WORK/stage1" --save-interval 50)
STAGE2=(--seq-length 1048576 --max-position-embeddings 1048576 --fpdt-chunk-size 131072 --rope-scaling-factor 128
        --train-iters "$STAGE2_ITERS" --eval-interval 50 --save "$WORK/stage2" --save-interval 25)

if [[ -n "${DRY_RUN:-}" ]]; then
    # Each stage's whole configuration, as the world of GPUS_PER_NODE ranks sees it. --load and
    # --finetune name what the step before makes, so they are left out here.
    for stage in 1 2; do
        echo "== stage $stage (dry run; --finetune --load of the previous step not checked)"
        declare -n ARGS="STAGE$stage"
        "$PYTHON" pretrain_llama.py "${COMMON[@]}" "${ARGS[@]}" --dry-run --dry-run-world-size "$GPUS_PER_NODE"
    done
    exit 0
fi

LAUNCH=("$PYTHON" -m torch.distributed.run --nproc-per-node "$GPUS_PER_NODE")

echo "== 1/5 convert $HF_MODEL"
if [[ ! -d "$WORK/converted" ]]; then
    "$PYTHON" tools/checkpoint/convert.py --model-type llama --loader hf --saver mcore \
        --load-dir "$HF_MODEL" --save-dir "$WORK/converted.tmp"
    mv "$WORK/converted.tmp" "$WORK/converted"
fi

echo "== 2/5 stage 1: 262144 tokens"
"${LAUNCH[@]}" pretrain_llama.py "${COMMON[@]}" "${STAGE1[@]}" --finetune --load "$WORK/converted"

echo "== 3/5 stage 2: 1048576 tokens"
"${LAUNCH[@]}" pretrain_llama.py "${COMMON[@]}" "${STAGE2[@]}" --finetune --load "$WORK/stage1"

echo "== 4/5 export to Hugging Face"
"$PYTHON" tools/checkpoint/convert.py --model-type llama --loader mcore --saver hf \
    --load-dir "$WORK/stage2" --save-dir "$WORK/hf" --dtype bfloat16 --max-shard-size 5GB

echo "== 5/5 pass-key retrieval"
# shellcheck disable=SC2086
"${LAUNCH[@]}" tools/eval_passkey.py --load "$WORK/stage2" --lengths $EVAL_LENGTHS \
    --depths 0 0.25 0.5 0.75 1 --samples 4 --fpdt-parallel-size "$GPUS_PER_NODE" --fpdt-chunk-size 131072 \
    --fpdt-offload --output "$WORK/passkey.jsonl" --plot "$WORK/passkey.svg"
