"""Launch scripts of Megatron-LM and Megatron-DeepSpeed run here: their flag lists, shapes shrunk to
the tiny test model, through --dry-run and a three-iteration CPU run (gloo). Each foreign flag that
changes nothing prints its note once; refused ones stop with one line naming the flag.

The lists are copied from the scripts (cited at each); what changed is marked "shrunk" (sizes,
lengths, parallel sizes, paths; the data becomes mock data with the script's tokenizer) or
"dropped" / "CPU" with the reason (a flag refused here, tested below; fp16, which needs a GPU).
"""

import json
import os

import pytest

from megatron.training.arguments import build_parser
from tests.helpers import TINY, run_pretrain, run_script

# Flags of the TensorBoard/W&B logging (megatron/training/arguments.py's logging group): passed when
# this tree defines them, as the scripts do.
_LOGGING = {"--tensorboard-dir", "--tensorboard-queue-size", "--log-timers-to-tensorboard",
            "--log-batch-size-to-tensorboard", "--log-validation-ppl-to-tensorboard"}


def _defined(flags):
    """``flags`` without the logging flags this tree does not define (each with its value)."""
    known = {s for a in build_parser()._actions for s in a.option_strings}
    out, skip = [], False
    for i, flag in enumerate(flags):
        if skip:
            skip = False
            continue
        if flag in _LOGGING and flag not in known:
            skip = i + 1 < len(flags) and not flags[i + 1].startswith("--")
            continue
        out.append(flag)
    return out


def gpt3_175b(assets, tmp_path):
    """NVIDIA/Megatron-LM examples/gpt3/train_gpt3_175b_distributed.sh
    (d98e8a64ddf34856e74b24714e3bedb2f5a39553)."""
    gpt_model_args = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",  # shrunk
                      "--seq-length", "128", "--max-position-embeddings", "128",  # shrunk
                      "--attention-backend", "auto"]
    training_args = ["--micro-batch-size", "2", "--global-batch-size", "4",  # shrunk
                     "--step-batch-size-schedule", "0:2 256:4",  # shrunk: its thresholds and batches
                     "--train-iters", "3",  # shrunk
                     "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--init-method-std",
                     "0.006", "--clip-grad", "1.0",
                     # CPU: --fp16 dropped (it needs a GPU)
                     "--lr", "6.0e-5", "--lr-decay-style", "cosine", "--min-lr", "6.0e-6", "--lr-warmup-fraction",
                     ".001", "--lr-decay-iters", "3"]  # shrunk
    model_parallel_args = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1"]  # shrunk
    data_args = ["--mock-data",  # shrunk: --data-path $DATA_PATH
                 "--vocab-file", os.path.join(assets, "gpt2/vocab.json"),
                 "--merge-file", os.path.join(assets, "gpt2/merges.txt"), "--split", "949,50,1"]
    eval_and_logging_args = ["--log-interval", "1",  # shrunk
                             "--save-interval", "3", "--eval-interval", "3",  # shrunk
                             "--save", str(tmp_path / "gpt3"), "--load", str(tmp_path / "gpt3"), "--eval-iters", "1",
                             "--tensorboard-dir", str(tmp_path / "tb_gpt3")]
    return _defined([*gpt_model_args, *training_args, *model_parallel_args, *data_args, *eval_and_logging_args])


def llama3_8b(tmp_path):
    """NVIDIA/Megatron-LM examples/llama/train_llama3_8b_h100_fp8.sh (d98e8a64ddf34856e74b24714e3bedb2f5a39553),
    DTYPE=bf16, mock data (its MOCK branch)."""
    model_args = ["--use-mcore-models", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
                  "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
                  "--kv-channels", "16", "--seq-length", "128", "--max-position-embeddings", "128",  # shrunk
                  "--position-embedding-type", "rope", "--rotary-base", "1000000", "--rotary-percent", "1.0",
                  "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--swiglu", "--normalization", "RMSNorm",
                  "--init-method-std", "0.0134", "--attention-backend", "fused",
                  "--apply-layernorm-1p",
                  "--untie-embeddings-and-output-weights", "--disable-bias-linear"]
    training_args = ["--micro-batch-size", "2", "--global-batch-size", "4",  # shrunk
                     "--train-samples", "12", "--lr-decay-samples", "11", "--lr-warmup-samples", "2",  # shrunk
                     "--lr", "0.00015", "--min-lr", "0.00001", "--decoupled-lr", "5.0e-4", "--decoupled-min-lr",
                     "4.5e-5",
                     "--lr-decay-style", "cosine", "--clip-grad", "1.0", "--weight-decay", "0.1", "--adam-beta1", "0.9",
                     "--adam-beta2", "0.95", "--bf16", "--grad-reduce-in-bf16", "--cross-entropy-loss-fusion",
                     "--calculate-per-token-loss", "--manual-gc", "--empty-unused-memory-level", "1",
                     "--exit-duration-in-mins", "235"]
    model_parallel_args = ["--tensor-model-parallel-size", "1", "--context-parallel-size", "1",  # shrunk
                           "--sequence-parallel"]
    ddp_args = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    data_args = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",  # shrunk
                 "--data-cache-path", str(tmp_path / "cache"), "--tiktoken-pattern", "v2", "--split", "99,1,0",
                 "--no-create-attention-mask-in-dataloader", "--no-mmap-bin-files", "--num-workers", "1"]
    eval_and_logging_args = ["--log-interval", "1", "--eval-iters", "1", "--eval-interval", "100",  # shrunk
                             "--save-interval", "1000", "--log-throughput",
                             # CPU: --profile --profile-step-start 4 --profile-step-end 6 dropped (an Nsight
                             # Systems capture needs a GPU)
                             "--ckpt-format", "torch_dist",
                             "--distributed-timeout-minutes", "60", "--save", str(tmp_path / "llama"),
                             "--load", str(tmp_path / "llama"), "--tensorboard-dir", str(tmp_path / "tb_llama")]
    return _defined([*model_args, *training_args, *model_parallel_args, *ddp_args, *data_args,
                     *eval_and_logging_args])


def deepspeed_fpdt_6_7b(assets, tmp_path, zero_stage=3):
    """deepspeedai/Megatron-DeepSpeed examples_deepspeed/sequence_parallel/ds_pretrain_gpt_6.7B_fpdt_32k.sh
    and its ds_config_gpt_TEMPLATE.json (4efb479d5317ce9b86096b9d8e3e8030b0b5263b), on two processes."""
    seq_len, sp_size, global_batch_size, batch_size = 128, 2, 4, 2  # shrunk
    train_tokens = 3 * global_batch_size * seq_len  # shrunk: three iterations
    # the template with its placeholders filled; CPU: bf16 for fp16 (whose loss-scale fields are noted)
    ds_config = {"train_batch_size": global_batch_size, "train_micro_batch_size_per_gpu": batch_size,
                 "steps_per_print": 1, "zero_optimization": {"stage": zero_stage}, "gradient_clipping": 1.0,
                 "prescale_gradients": False, "bf16": {"enabled": True}, "wall_clock_breakdown": False}
    config_json = tmp_path / f"ds_config_zero{zero_stage}.json"
    config_json.write_text(json.dumps(ds_config))
    checkpoint_path = str(tmp_path / "ds")
    data_options = ["--vocab-file", os.path.join(assets, "gpt2/vocab.json"),
                    "--merge-file", os.path.join(assets, "gpt2/merges.txt"),
                    "--mock-data",  # shrunk: --data-path BookCorpusDataset_text_document
                    "--data-impl", "mmap"]
    megatron_options = [
        "--override-opt_param-scheduler", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
        "--tensor-model-parallel-size", "1", "--ds-sequence-parallel-fpdt",
        "--ds-sequence-parallel-fpdt-chunk-size", "64",  # shrunk
        "--ds-sequence-parallel-fpdt-offloading", "--ds-sequence-parallel-size", str(sp_size),
        "--init-method-std", "0.009", "--lr-decay-tokens", str(train_tokens),
        "--lr-warmup-tokens", str(global_batch_size * seq_len),  # shrunk
        "--micro-batch-size", str(batch_size), "--exit-duration-in-mins", "30000000",
        "--global-batch-size", str(global_batch_size), "--num-layers", "2", "--hidden-size", "64",  # shrunk
        "--num-attention-heads", "4", "--seq-length", str(seq_len), "--max-position-embeddings", str(seq_len),
        "--train-tokens", str(train_tokens), "--train-samples", str(3 * 2 * global_batch_size),  # shrunk
        "--lr", "1.2e-4", "--min-lr", "1.0e-6", "--lr-decay-style", "cosine", "--split", "949,50,1",
        "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "1", "--save-interval", "100",  # shrunk
        "--weight-decay", "0.1", "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--clip-grad", "1.0",
        "--hysteresis", "2", "--num-workers", "0",
        # CPU: --fp16 dropped (the JSON's bf16 instead)
        "--seed", "1234", "--load", checkpoint_path, "--save", checkpoint_path,
        "--no-async-tensor-model-parallel-allreduce", "--use-flash-attn-v2", "--tensorboard-queue-size", "1",
        "--use-rotary-position-embeddings", "--rotary-percent", "0.25", "--rotary-position-embeddings-theta",
        "100000000", "--log-timers-to-tensorboard", "--log-batch-size-to-tensorboard",
        "--log-validation-ppl-to-tensorboard", "--tensorboard-dir", str(tmp_path / "tb_ds"),
        "--checkpoint-activations",
        # newer versions of the script: host buffers not pinned
        "--no-ds-sequence-parallel-fpdt-pin-memory"]
    deepspeed_options = ["--deepspeed", "--deepspeed_config", str(config_json),
                         "--zero-stage", str(zero_stage),
                         "--pipeline-model-parallel-size", "1", "--no-pipeline-parallel",
                         "--deepspeed-activation-checkpointing", "--checkpoint-in-cpu"]
    return _defined([*megatron_options, *data_options, *deepspeed_options])


def _notes_once(out: str, expected):
    for flag in expected:
        lines = [line for line in out.splitlines() if line.startswith(f"note: {flag} ")]
        assert len(lines) == 1, (flag, out[-3000:])
    assert "unrecognized arguments" not in out


GPT3_NOTES = ["--attention-backend"]
LLAMA_NOTES = ["--use-mcore-models", "--attention-backend", "--grad-reduce-in-bf16", "--cross-entropy-loss-fusion",
               "--calculate-per-token-loss", "--manual-gc", "--empty-unused-memory-level", "--overlap-grad-reduce",
               "--overlap-param-gather", "--tiktoken-pattern", "--no-create-attention-mask-in-dataloader",
               "--no-mmap-bin-files", "--num-workers", "--log-throughput", "--ckpt-format"]
DS_NOTES = ["--hysteresis", "--num-workers", "--no-async-tensor-model-parallel-allreduce",
            "--no-ds-sequence-parallel-fpdt-pin-memory", "--data-impl", "--deepspeed",
            "--deepspeed-activation-checkpointing", "--deepspeed_config steps_per_print",
            "--deepspeed_config wall_clock_breakdown", "--deepspeed_config prescale_gradients"]


@pytest.mark.parametrize("name", ["gpt3", "llama3", "deepspeed_fpdt"])
def test_dry_run(assets, tmp_path, name):
    flags, script, notes, expect = {
        "gpt3": (gpt3_175b(assets, tmp_path), "pretrain_gpt.py", GPT3_NOTES,
                 ["GPT2BPETokenizer", "ramp-up: global batch 2 from 0, 4 from 2 samples consumed",
                  "schedule: 3 iterations; LR cosine, warmup 0.012 and decay 12 samples"]),
        "llama3": (llama3_8b(tmp_path), "pretrain_gpt.py", LLAMA_NOTES,
                   ["heads 4/kv 2", "schedule: 3 iterations; LR cosine, warmup 0.5 and decay 2.75 iterations"]),
        "deepspeed_fpdt": (deepspeed_fpdt_6_7b(assets, tmp_path), "pretrain_gpt.py", DS_NOTES,
                           ["world 2 = TP 1 x FPDT 2", "64 tokens per rank in 2 chunks", "offload on",
                            "schedule: 3 iterations; LR cosine, warmup 1 and decay 3 iterations"]),
    }[name]
    world = ["--dry-run-world-size", "2"] if name == "deepspeed_fpdt" else []
    proc = run_script(1, script, [*flags, "--dry-run", *world], timeout=300)
    out = proc.stdout + proc.stderr
    assert "dry run: the configuration is valid" in out, out
    _notes_once(out, notes)
    for text in expect:
        assert text in out, out


@pytest.mark.parametrize("name, nproc", [("gpt3", 1), ("llama3", 1), ("deepspeed_fpdt", 2)])
def test_short_run_trains(assets, tmp_path, name, nproc):
    flags, notes = {"gpt3": (gpt3_175b(assets, tmp_path), GPT3_NOTES),
                    "llama3": (llama3_8b(tmp_path), LLAMA_NOTES),
                    "deepspeed_fpdt": (deepspeed_fpdt_6_7b(assets, tmp_path), DS_NOTES)}[name]
    rows, out = run_pretrain(tmp_path, name, nproc, flags, script="pretrain_gpt.py", timeout=600)
    _notes_once(out, notes)
    assert [r["iteration"] for r in rows] == [1, 2, 3], out[-3000:]
    assert all(r["lm_loss"] > 0 for r in rows)
    if name == "gpt3":  # its step schedule: 2 sequences, then 4 from 256 tokens (2 samples) on
        assert [(r["global_batch_size"], r["consumed_samples"]) for r in rows] == [(2, 2), (4, 6), (4, 10)]
    assert rows[-1]["lr"] < rows[0]["lr"]  # cosine after the warmup


@pytest.mark.parametrize("change, message", [
    (("--zero-stage", "3", "4"), "--zero-stage 4: ZeRO stages are 0 to 3"),
    (("--ckpt-format", "torch_dist", "torch"), "--ckpt-format torch is not supported"),
])
def test_refused_flags_stop_with_one_line(assets, tmp_path, change, message):
    flag, old, new = change
    flags = deepspeed_fpdt_6_7b(assets, tmp_path) + ["--ckpt-format", "torch_dist"]
    i = flags.index(flag)
    assert flags[i + 1] == old
    flags[i + 1] = new
    proc = run_script(1, "pretrain_gpt.py", [*flags, "--dry-run", "--dry-run-world-size", "2"], expect_rc=2,
                      timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


@pytest.mark.slow  # the groups' LRs are checked step by step in tests/unit/test_flag_compat.py
def test_decoupled_lr_trains_the_embedding_and_output_weights_at_their_own_rate(tmp_path):
    """--decoupled-lr equal to --lr (and --decoupled-min-lr to --min-lr) is the run without it,
    bit for bit; another value changes the losses from the second iteration on."""
    base = [*TINY, "--train-iters", "3", "--lr", "1e-2", "--min-lr", "1e-3", "--lr-decay-style", "cosine",
            "--untie-embeddings-and-output-weights"]
    runs = {name: [r["lm_loss"] for r in run_pretrain(tmp_path, name, 1, [*base, *extra])[0]] for name, extra in (
        ("plain", []), ("same", ["--decoupled-lr", "1e-2", "--decoupled-min-lr", "1e-3"]),
        ("other", ["--decoupled-lr", "1e-1"]))}
    assert len(runs["plain"]) == 3 and runs["same"] == runs["plain"]
    assert runs["other"][0] == runs["plain"][0] and runs["other"][1:] != runs["plain"][1:]


def test_batch_rampup_reads_each_batch_and_resumes_exactly(tmp_path):
    """A step schedule on DP 2: the first iteration (batch 2) is a constant-batch-2 run's, bit for
    bit; a run stopped after iteration 2 and resumed across the batch change (2 -> 4 -> 8) gives the
    straight run's losses, gradient norms and LRs exactly."""
    base = [*TINY, "--micro-batch-size", "1", "--lr", "1e-2", "--min-lr", "1e-3", "--lr-decay-style", "cosine",
            "--lr-warmup-fraction", "0.2"]
    ramp = [*base, "--train-samples", "24", "--step-batch-size-schedule", "0:2 512:4 1024:8", "--global-batch-size",
            "8"]
    straight, _ = run_pretrain(tmp_path, "straight", 2, ramp)
    assert [(r["global_batch_size"], r["consumed_samples"]) for r in straight] == [(2, 2), (2, 4), (4, 8), (8, 16),
                                                                                 (8, 24)]
    constant, _ = run_pretrain(tmp_path, "constant", 2, [*base, "--global-batch-size", "2", "--train-iters", "1",
                                                         "--save", str(tmp_path / "constant_ckpt")])
    assert constant[0]["lm_loss"] == straight[0]["lm_loss"]
    assert constant[0]["grad_norm"] == straight[0]["grad_norm"]
    save = ["--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt")]
    first, _ = run_pretrain(tmp_path, "first", 2, [*ramp, *save, "--exit-interval", "2"])
    second, out = run_pretrain(tmp_path, "second", 2, [*ramp, *save])
    key = ("lm_loss", "grad_norm", "lr", "global_batch_size", "consumed_samples")
    assert [[r[k] for k in key] for r in first + second] == [[r[k] for k in key] for r in straight], out[-3000:]
    # the constant-batch run's checkpoint counts its LR schedule in iterations: a ramp-up run refuses it
    _, out = run_pretrain(tmp_path, "mixed", 2, [*ramp, "--load", str(tmp_path / "constant_ckpt")], expect_rc=1)
    assert "LR schedule counts iterations and this run's counts samples" in out, out[-3000:]
