"""Megatron-LM's and DeepSpeed's flags here (megatron/training/compat.py): the sample- and token-based
LR schedule against Megatron-LM's own arithmetic, DeepSpeed's JSON config, and the flag table."""

import dataclasses
import json

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron.training import compat
from megatron.training.arguments import ArgumentError, parse_args, startup_notes, validate_args
from tests.helpers import TINY

GLOBAL_BATCH = 4  # TINY's
SEQ = 128  # TINY's


def config_of(*flags):
    return validate_args(parse_args([*TINY, *flags]), world_size=1)


def refusal(*flags) -> str:
    with pytest.raises(ArgumentError) as e:
        config_of(*flags)
    return str(e.value)


def lrs(scheduler, steps: int, increment: int):
    out = []
    for _ in range(steps):
        scheduler.step(increment=increment)
        out.append(scheduler.optimizer.param_groups[0]["lr"])
    return out


def _scheduler(**kwargs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=3e-4, min_lr=3e-5, start_wd=0.1, end_wd=0.1,
                                   wd_incr_style="constant", **kwargs)


def megatron_lrs(*, train_samples=None, train_iters=None, lr_decay_samples=None, lr_decay_iters=None,
                 lr_warmup_samples=0, lr_warmup_iters=0, lr_warmup_fraction=None, style="cosine"):
    """Megatron-LM's get_optimizer_param_scheduler and update_train_iters (megatron/training/training.py,
    NVIDIA/Megatron-LM d98e8a64ddf34856e74b24714e3bedb2f5a39553) with a constant global batch: the
    scheduler counts samples and steps by the global batch."""
    gbs = GLOBAL_BATCH
    if train_iters:
        decay = (lr_decay_iters or train_iters) * gbs
        warmup = lr_warmup_fraction * decay if lr_warmup_fraction is not None else lr_warmup_iters * gbs
        wd_steps = train_iters * gbs
    else:
        train_iters = train_samples // gbs
        decay = lr_decay_samples if lr_decay_samples is not None else train_samples
        warmup = lr_warmup_fraction * decay if lr_warmup_fraction is not None else lr_warmup_samples
        wd_steps = train_samples
    scheduler = _scheduler(lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=style,
                           wd_incr_steps=wd_steps)
    return train_iters, lrs(scheduler, train_iters, gbs)


def our_lrs(config, style="cosine"):
    schedule = config.lr_schedule
    scheduler = _scheduler(lr_warmup_steps=schedule.warmup_steps, lr_decay_steps=schedule.decay_steps,
                           lr_decay_style=style, wd_incr_steps=schedule.train_iters)
    return config.training.train_iters, lrs(scheduler, config.training.train_iters, 1)


@pytest.mark.parametrize("flags, megatron", [
    # Megatron-LM examples/llama/train_llama3_8b_h100_fp8.sh's form, shrunk
    (["--train-samples", "1003", "--lr-decay-samples", "990", "--lr-warmup-samples", "42"],
     dict(train_samples=1003, lr_decay_samples=990, lr_warmup_samples=42)),
    (["--train-samples", "400", "--lr-warmup-fraction", "0.013"], dict(train_samples=400, lr_warmup_fraction=0.013)),
    # examples/gpt3/train_gpt3_175b_distributed.sh's form: iterations with a warmup fraction of the decay
    (["--train-iters", "120", "--lr-decay-iters", "100", "--lr-warmup-fraction", "0.05"],
     dict(train_iters=120, lr_decay_iters=100, lr_warmup_fraction=0.05)),
    (["--train-iters", "50", "--lr-warmup-iters", "7"], dict(train_iters=50, lr_warmup_iters=7)),
])
@pytest.mark.parametrize("style", ["cosine", "linear", "inverse-square-root"])
def test_sample_based_schedule_is_megatron_lms(flags, megatron, style):
    config = config_of(*flags, "--lr-decay-style", style, "--lr", "3e-4", "--min-lr", "3e-5")
    iters, expected = megatron_lrs(**megatron, style=style)
    ours_iters, ours = our_lrs(config, style)
    assert ours_iters == iters
    if style == "inverse-square-root" and config.lr_schedule.warmup_steps < 1:
        return  # Megatron clamps the warmup to one step of its unit (a sample here, an iteration there)
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_override_opt_param_scheduler_reaches_the_training_config():
    assert config_of("--train-iters", "5", "--override-opt_param-scheduler").training.override_opt_param_scheduler


def test_train_samples_gives_iterations_of_the_global_batch():
    assert config_of("--train-samples", "41").training.train_iters == 41 // GLOBAL_BATCH
    assert config_of("--train-samples", "41", "--global-batch-size", "8").training.train_iters == 5


def test_deepspeed_tokens_are_samples_times_sequence_length():
    """Megatron-DeepSpeed's --lr-warmup-tokens/--lr-decay-tokens (ds_pretrain_gpt_6.7B_fpdt_32k.sh) as
    the same lengths in samples; --train-tokens ends the run at the first iteration that reaches it."""
    config = config_of("--train-samples", "400", "--lr-warmup-tokens", str(30 * SEQ), "--lr-decay-tokens",
                       str(350 * SEQ), "--train-tokens", str(90 * GLOBAL_BATCH * SEQ + 1))
    assert config.training.train_iters == 91  # ceil, before the 100 of --train-samples
    _, ours = our_lrs(config)
    _, expected = megatron_lrs(train_samples=400, lr_warmup_samples=30, lr_decay_samples=350)
    assert ours == pytest.approx(expected[:91], rel=1e-12)
    assert config_of("--train-samples", "400", "--train-tokens", str(10 ** 9)).training.train_iters == 100


def test_resolution_is_idempotent():
    """RunConfig sets train_iters from the samples; remaking the parts keeps the same schedule."""
    import dataclasses

    config = config_of("--train-samples", "400", "--lr-warmup-fraction", "0.1", "--train-tokens", str(60 * 4 * SEQ))
    again = dataclasses.replace(config, training=dataclasses.replace(config.training))
    assert again.lr_schedule == config.lr_schedule and again.training.train_iters == 60


@pytest.mark.parametrize("flags, message", [
    (["--train-iters", "10", "--train-samples", "40"], "give one of --train-iters 10 and --train-samples 40"),
    (["--train-samples", "40", "--lr-decay-iters", "5"], "--lr-decay-iters 5: this run counts samples"),
    (["--train-iters", "10", "--lr-warmup-samples", "5"], "use --lr-warmup-iters"),
    (["--train-samples", "40", "--lr-warmup-samples", "4", "--lr-warmup-fraction", "0.1"],
     "not --lr-warmup-samples and --lr-warmup-fraction"),
    (["--train-samples", "3"], "--train-samples 3 is less than one global batch"),
    (["--train-samples", "40", "--lr-warmup-samples", "40"], "must be shorter than the decay"),
    (["--lr-warmup-fraction", "0.1"], "give the run's length"),
    (["--train-iters", "10", "--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction 1.5 is out of range"),
])
def test_schedule_refusals_say_what_to_change(flags, message):
    assert message in refusal(*flags)


# -- the flag table ----------------------------------------------------------------


def test_translations():
    config = config_of("--train-iters", "5", "--num-key-value-heads", "2", "--use-rotary-position-embeddings",
                       "--rotary-position-embeddings-theta", "500000", "--no-pipeline-parallel",
                       "--checkpoint-activations", "--checkpoint-in-cpu", "--zero-stage", "1",
                       "--normalization", "rmsnorm")
    m, t = config.model, config.training
    assert (m.num_query_groups, m.position_embedding_type, m.rotary_base) == (2, "rope", 5e5)
    assert m.normalization == "RMSNorm"
    assert (t.recompute_granularity, t.offload_recompute_inputs) == ("full", True)
    assert config.parallel.use_distributed_optimizer
    t = config_of("--train-iters", "5", "--recompute-activations", "--activations-checkpoint-method", "block").training
    assert (t.recompute_granularity, t.recompute_method) == ("selective", "block")
    for stage, reshard in (("2", False), ("3", True)):  # DeepSpeed's ZeRO-2/3: FSDP2 (megatron/training/sharding.py)
        parallel = config_of("--train-iters", "5", "--zero-stage", stage).parallel
        assert parallel.use_torch_fsdp2 and not parallel.use_distributed_optimizer
        assert parallel.fsdp_reshard_after_forward == reshard


def test_megatron_lm_s_megatron_fsdp_flags_reach_the_parallel_config():
    """Megatron-LM's recipe for Megatron-FSDP (its user guide's required flags) parses here; on the CPU
    each strategy maps onto this project's sharding (ParallelConfig.cpu_equivalent), and with FPDT
    the chunked MLP returns its parameters' gradients once under the sharded-gradient strategies."""
    fpdt = ("--fpdt", "--attention-dropout", "0")
    for strategy, once, zero1, fsdp2, reshard in (("optim", False, True, False, True),
                                                  ("optim_grads", True, False, True, False),
                                                  ("optim_grads_params", True, False, True, True)):
        config = config_of("--train-iters", "5", "--use-megatron-fsdp", "--data-parallel-sharding-strategy", strategy,
                           "--no-gradient-accumulation-fusion", "--use-distributed-optimizer", "--ckpt-format",
                           "fsdp_dtensor", *fpdt)
        par = config.parallel
        assert (par.use_megatron_fsdp, par.data_parallel_sharding_strategy) == (True, strategy)
        assert config.fpdt.param_grads_once is once
        cpu = par.cpu_equivalent()
        assert not cpu.use_megatron_fsdp and cpu.data_parallel_sharding_strategy == "no_shard"
        assert (cpu.use_distributed_optimizer, cpu.use_torch_fsdp2) == (zero1, fsdp2)
        assert not fsdp2 or cpu.fsdp_reshard_after_forward is reshard
        mapped = dataclasses.replace(config, parallel=cpu)  # as the Trainer does on the CPU
        assert mapped.fpdt.param_grads_once is False
    assert config_of("--train-iters", "5", *fpdt).fpdt.param_grads_once is False
    from megatron.training.config import ParallelConfig

    with pytest.raises(ValueError, match="--use-megatron-fsdp does not take pipeline stages: .* no pipeline axis .* "
                                         "Use --use-torch-fsdp2"):
        ParallelConfig(world_size=2, use_megatron_fsdp=True, data_parallel_sharding_strategy="optim",
                       pipeline_model_parallel_size=2)
    # tensor parallelism composes (megatron-core's mesh: data x context x TP)
    tp = ParallelConfig(world_size=4, use_megatron_fsdp=True, data_parallel_sharding_strategy="optim",
                        tensor_model_parallel_size=2)
    assert tp.tensor_model_parallel_size == 2 and tp.cpu_equivalent().tensor_model_parallel_size == 2


@pytest.mark.parametrize("flags, message", [
    (["--zero-stage", "4"], "--zero-stage 4: ZeRO stages are 0 to 3"),
    (["--zero-stage", "3", "--use-distributed-optimizer"], "--use-torch-fsdp2 shards the optimizer state already"),
    (["--use-torch-fsdp2", "--fp16"], "--use-torch-fsdp2 with --fp16 is not supported"),
    (["--num-experts", "8"], "--num-experts 8 is not supported: no mixture-of-experts"),
    (["--ckpt-format", "torch"], "--ckpt-format torch is not supported"),
    (["--num-key-value-heads", "1", "--num-query-groups", "2", "--group-query-attention"],
     "--num-key-value-heads 1 and --num-query-groups 2 disagree"),
    (["--checkpoint-activations", "--recompute-granularity", "selective"],
     "--checkpoint-activations and --recompute-granularity selective disagree"),
    (["--checkpoint-in-cpu"], "--checkpoint-in-cpu keeps checkpointed layer inputs in host memory"),
    (["--recompute-granularity", "selective", "--fpdt", "--attention-dropout", "0"],
     "--recompute-granularity selective (megatron-core's core-attention recompute) does not apply to FPDT"),
    (["--calculate-per-token-loss", "--eod-mask-loss"], "--calculate-per-token-loss with --eod-mask-loss"),
    (["--no-position-embedding"], "--no-position-embedding with learned absolute positions is not supported"),
    (["--expert-model-parallel-size", "8"], "--expert-model-parallel-size 8 is not supported: no mixture-of-experts"),
    # Megatron-DeepSpeed's dense scripts pass --num-experts 1 (noted); more experts are MoE
    (["--num-experts", "1", "4"], "--num-experts 1 4 is not supported: no mixture-of-experts"),
    (["--optimizer", "sgd"], "--optimizer sgd is not supported: Adam is the only optimizer here"),
    (["--recompute-modules", "core_attn", "mlp"], "--recompute-modules core_attn mlp is not supported"),
    (["--use-megatron-fsdp"], "--use-megatron-fsdp needs --data-parallel-sharding-strategy optim, optim_grads or "
                              "optim_grads_params"),
    (["--data-parallel-sharding-strategy", "optim"], "--data-parallel-sharding-strategy optim is Megatron-FSDP's: add "
                                                     "--use-megatron-fsdp"),
    (["--use-megatron-fsdp", "--use-torch-fsdp2", "--data-parallel-sharding-strategy", "optim"],
     "--use-megatron-fsdp and --use-torch-fsdp2 are two sharding implementations: give one of them"),
    (["--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim", "--fp16"],
     "--use-megatron-fsdp with --fp16 is not supported"),
    (["--DDP-impl", "FSDP"], "for FSDP use --use-torch-fsdp2 or --use-megatron-fsdp"),
    (["--recompute-activations", "--checkpoint-activations"], "disagree"),
    (["--loss-scale", "4096", "--fp16"], "--loss-scale 4096 is not supported: a static fp16 loss scale"),
    (["--activations-checkpoint-method", "every"], "--activations-checkpoint-method every: use uniform or block"),
])
def test_refusals_name_the_flag(flags, message):
    assert message in refusal("--train-iters", "5", *flags)


def test_every_flag_of_the_table_parses_and_gets_its_verdict():
    for flag in compat.TABLE:
        for name in flag.names:
            argv = [name, "x"] if flag.value else [name]
            args = parse_args([*TINY, "--train-iters", "5", *argv])
            value = (["x"] if flag.nargs else "x") if flag.value else True
            assert compat.given_flags(args, flag) == [(name, value)]
            if flag.verdict == compat.NOTED:
                value = next(v for v in ("single", "mmap", "torch_dist", "2", "auto", "local", "1", "adam",
                                         "core_attn", "x")
                             if flag.refuse_unless is None or flag.refuse_unless(v)) if flag.value else None
                extra = ["--position-embedding-type", "rope"] if name == "--no-position-embedding" else []
                args = parse_args([*TINY, "--train-iters", "5", *extra, name, *([value] if value else [])])
                validate_args(args, world_size=1)
                notes = startup_notes(args)
                assert len(notes) == 1 and notes[0].startswith(f"note: {name}") and "changes nothing" in notes[0]
            elif flag.verdict == compat.REFUSED:
                with pytest.raises(ArgumentError, match=name):
                    validate_args(args, world_size=1)


def test_selective_recompute_reaches_megatron_core():
    from megatron.training.models import transformer_config

    tcfg = transformer_config(config_of("--train-iters", "5", "--recompute-granularity", "selective"))
    assert tcfg.recompute_granularity == "selective" and tcfg.recompute_modules == ["core_attn"]


# -- DeepSpeed's JSON config --------------------------------------------------------


def deepspeed(tmp_path, config: dict, *flags):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    args = parse_args([*TINY, "--train-iters", "5", "--deepspeed", "--deepspeed_config", str(path), *flags])
    return args, path


# examples_deepspeed/sequence_parallel/ds_config_gpt_TEMPLATE.json (deepspeedai/Megatron-DeepSpeed
# 4efb479d5317ce9b86096b9d8e3e8030b0b5263b) with its placeholders filled for TINY and bf16 for fp16
DS_TEMPLATE = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 1,
               "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0, "prescale_gradients": False,
               "bf16": {"enabled": True}, "wall_clock_breakdown": False}


def test_deepspeed_json_maps_onto_our_flags(tmp_path):
    config = dict(DS_TEMPLATE, train_batch_size=8, train_micro_batch_size_per_gpu=1, gradient_clipping=0.5,
                  gradient_accumulation_steps=8)
    args, _ = deepspeed(tmp_path, config)
    args.command_line_flags = args.command_line_flags - {"micro_batch_size", "global_batch_size"}
    run = validate_args(args, world_size=1)
    t = run.training
    assert (t.micro_batch_size, t.global_batch_size, t.clip_grad, t.bf16) == (1, 8, 0.5, True)
    assert run.parallel.use_distributed_optimizer
    notes = startup_notes(args)
    assert [n.split(" changes")[0] for n in notes] == [
        "note: --deepspeed", "note: --deepspeed_config steps_per_print",
        "note: --deepspeed_config wall_clock_breakdown", "note: --deepspeed_config prescale_gradients"]


def test_deepspeed_fp16_template_fields_are_noted(tmp_path):
    fp16 = {"enabled": True, "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1,
            "initial_scale_power": 11}
    args, _ = deepspeed(tmp_path, dict(DS_TEMPLATE, bf16={"enabled": False}, fp16=fp16))
    out = compat.translate(args, args.command_line_flags)
    assert out.fp16 and not out.bf16
    assert sum("fp16." in n for n in startup_notes(args)) == 5


@pytest.mark.parametrize("change, flags, message", [
    (dict(train_micro_batch_size_per_gpu=1), ["--micro-batch-size", "2"],
     "train_micro_batch_size_per_gpu 1 and --micro-batch-size 2 disagree"),
    (dict(gradient_clipping=0.5), ["--clip-grad", "1.0"], "gradient_clipping 0.5 and --clip-grad 1.0 disagree"),
    ({}, ["--fp16"], "bf16.enabled true and --fp16 disagree"),
    ({}, ["--zero-stage", "0"], "zero_optimization.stage 1 and --zero-stage 0 disagree"),
    (dict(zero_optimization={"stage": 3}), ["--use-distributed-optimizer"],
     "--use-torch-fsdp2 shards the optimizer state already"),
    (dict(zero_optimization={"stage": 1, "offload_optimizer": {"device": "cpu"}}), [],
     "zero_optimization.offload_optimizer is not supported here"),
    (dict(optimizer={"type": "Adam"}), [], "optimizer is not supported here"),
    (dict(gradient_accumulation_steps=4), [], "gradient_accumulation_steps 4 disagrees with the run's 2"),
])
def test_deepspeed_json_refusals(tmp_path, change, flags, message):
    args, _ = deepspeed(tmp_path, dict(DS_TEMPLATE, **change), *flags)
    with pytest.raises(ArgumentError) as e:
        validate_args(args, world_size=1)
    assert message in str(e.value)


def test_deepspeed_json_unreadable(tmp_path):
    args = parse_args([*TINY, "--train-iters", "5", "--deepspeed-config", str(tmp_path / "none.json")])
    with pytest.raises(ArgumentError, match="none.json: No such file"):
        validate_args(args, world_size=1)
    (tmp_path / "bad.json").write_text("{")
    args = parse_args([*TINY, "--train-iters", "5", "--deepspeed-config", str(tmp_path / "bad.json")])
    with pytest.raises(ArgumentError, match="is not JSON"):
        validate_args(args, world_size=1)


def test_flag_counts_use_the_parsers_view_without_parse_args():
    """A namespace not made by parse_args (no command_line_flags): flags that differ from the defaults count."""
    args = parse_args([*TINY, "--train-iters", "5", "--clip-grad", "2.0", "--use-rotary-position-embeddings",
                       "--position-embedding-type", "learned_absolute"])
    with pytest.raises(ArgumentError, match="--use-rotary-position-embeddings and --position-embedding-type "
                                            "learned_absolute disagree"):
        validate_args(args, world_size=1)
    del args.command_line_flags  # learned_absolute is the default: not counted as given
    assert validate_args(args, world_size=1).model.position_embedding_type == "rope"
    args.position_embedding_type = "yarn"
    with pytest.raises(ArgumentError, match="--use-rotary-position-embeddings and --position-embedding-type yarn"):
        validate_args(args, world_size=1)


# -- --decoupled-lr / --decoupled-min-lr ------------------------------------------------------------


def _cosine(step, warmup, decay, peak, final):
    """Megatron's linear warmup then cosine decay, written out."""
    import math

    if step < warmup:
        return peak * step / warmup
    if step > decay:
        return final
    ratio = (step - warmup) / (decay - warmup)
    return final + (peak - final) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


def test_decoupled_lr_gives_the_embedding_and_output_weights_their_own_schedule():
    """HostAdamW's groups under megatron-core's scheduler: the weights megatron-core marks
    is_embedding_or_output_parameter follow --decoupled-lr / --decoupled-min-lr, every other weight
    --lr / --min-lr, step by step (the schedule written out independently)."""
    from megatron.training.optimizer import HostAdamW

    model = torch.nn.ModuleDict({"embedding": torch.nn.Embedding(10, 4), "hidden": torch.nn.Linear(4, 4),
                                 "norm": torch.nn.LayerNorm(4), "output": torch.nn.Linear(4, 10, bias=False)})
    model.embedding.weight.is_embedding_or_output_parameter = True
    model.output.weight.is_embedding_or_output_parameter = True
    optimizer = HostAdamW(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, clip_grad=1.0,
                          tp_group=None, decoupled_lr=(4.5e-5, 5e-4))
    groups = optimizer.param_groups
    decoupled = [g for g in groups if "max_lr" in g]
    assert [id(p) for g in decoupled for p in g["params"]] == [id(model.embedding.weight), id(model.output.weight)]
    assert all(g["wd_mult"] == 1.0 for g in decoupled) and "max_lr" not in groups[0]
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=1.5e-4, min_lr=1e-5, lr_warmup_steps=2,
                                        lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                                        wd_incr_steps=12, wd_incr_style="constant")
    for step in range(1, 13):
        scheduler.step(increment=1)
        for group in groups:
            peak, final = (5e-4, 4.5e-5) if "max_lr" in group else (1.5e-4, 1e-5)
            assert group["lr"] == pytest.approx(_cosine(step, 2, 10, peak, final), rel=1e-12), (step, group)


def test_without_decoupled_lr_the_groups_are_as_before():
    from megatron.training.optimizer import _param_groups

    model = torch.nn.ModuleDict({"embedding": torch.nn.Embedding(10, 4), "norm": torch.nn.LayerNorm(4)})
    model.embedding.weight.is_embedding_or_output_parameter = True
    groups = _param_groups(model)
    assert [(len(g["params"]), g["wd_mult"]) for g in groups] == [(1, 1.0), (2, 0.0)]
    assert not any("max_lr" in g for g in groups)


@pytest.mark.parametrize("flags,message", [
    (["--decoupled-min-lr", "1e-5"], "--decoupled-min-lr needs --decoupled-lr"),
    (["--decoupled-lr", "1e-6", "--min-lr", "1e-5"], "--decoupled-min-lr 1e-05 is above --decoupled-lr 1e-06 "
                                                     "(it defaults to --min-lr)"),
    (["--decoupled-lr", "-1"], "--decoupled-lr"),
])
def test_decoupled_lr_refusals(flags, message):
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_args(parse_args([*TINY, "--train-iters", "2", "--lr", "1e-4", *flags]), world_size=1)
