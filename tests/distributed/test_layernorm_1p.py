"""--apply-layernorm-1p (zero-centred norm weights) at the model level, float32 on the CPU.

Baseline (one process): a model built with the flag whose norm weights are the plain model's
less 1 gives the plain model's losses and gradients, and at init its norm weights are zero.
FPDT (2 processes, FPDT 2, several chunks): with the flag, the same losses and gradients as the
1p baseline. Two configurations: GPT (LayerNorm, norms in the QKV loop and the MLP chunks) and
Llama with q/k layernorm (RMSNorm; q/k norms and the whole-sequence input norm).
"""

from __future__ import annotations

import functools
import zlib

import pytest
import torch
import torch.distributed as dist

from fpdt_ext.core.layout import fpdt_shard, fpdt_shard_batch
from fpdt_ext.testing.spawn import run_world

SEQ, BATCH, VOCAB = 32, 1, 64
COMMON = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "48",
          "--seq-length", str(SEQ), "--micro-batch-size", str(BATCH), "--train-iters", "1", "--mock-data",
          "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", "16", "--attention-dropout", "0",
          "--hidden-dropout", "0", "--seed", "7"]
CONFIGS = {
    "gpt": [],
    "llama_qk": ["--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--position-embedding-type",
                 "rope", "--group-query-attention", "--num-query-groups", "2", "--qk-layernorm"],
}
ONE_P = ["--apply-layernorm-1p"]
FPDT = ["--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "8"]  # 4 chunks of 8 tokens


def _is_norm_weight(name):
    return name.endswith("layernorm.weight")


def _set_weights(model, one_p):
    """The same weights in every model, by parameter name: norm weights around 1 (less 1 with
    ``one_p``), everything else small."""
    norms = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if _is_norm_weight(name):
                norms += 1
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen) - (1 if one_p else 0))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return norms


def _batch():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(BATCH, SEQ),
            "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous()}


def _args(flags, world_size):
    from megatron.training.arguments import parse_args, validate_args

    return validate_args(parse_args(COMMON + flags), world_size=world_size)


def _step(model, batch, denominator):
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    (losses * batch["loss_mask"]).sum().div(denominator).backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def baseline_worker(rank, world_size):
    from megatron.training.initialize import initialize
    from megatron.training.models import build_model

    groups = initialize(_args(CONFIGS["gpt"], 1))
    batch, out = _batch(), {}
    for config, flags in CONFIGS.items():
        results = {}
        for one_p in (False, True):
            model = build_model(_args(flags + (ONE_P if one_p else []), 1), groups, VOCAB)
            init = {n: p.detach().clone() for n, p in model.named_parameters() if _is_norm_weight(n)}
            norms = _set_weights(model, one_p)
            results[one_p] = (init, norms, *_step(model, batch, batch["loss_mask"].sum()))
        out[config] = results
    return out


def fpdt_worker(rank, world_size):
    from megatron.training.initialize import initialize
    from megatron.training.models import build_model

    groups = initialize(_args(CONFIGS["gpt"] + ONE_P + FPDT, 2))
    full, out = _batch(), {}
    for config, flags in CONFIGS.items():
        args = _args(flags + ONE_P + FPDT, 2)
        model = build_model(args, groups, VOCAB)
        _set_weights(model, one_p=True)
        batch = fpdt_shard_batch(full, sp_rank=groups.sp_rank, sp_size=2, num_chunks=args.fpdt_num_chunks)
        losses, grads = _step(model, batch, full["loss_mask"].sum())
        for g in grads.values():
            dist.all_reduce(g, group=groups.sp)  # each FPDT rank saw part of the tokens
        out[config] = (losses, grads, groups.sp_rank, args.fpdt_num_chunks)
    return out


@functools.lru_cache(maxsize=None)
def baseline():
    return run_world(1, baseline_worker)[0]


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_baseline_with_layernorm_1p_equals_the_plain_model_with_weights_less_one(config):
    plain, one_p = baseline()[config][False], baseline()[config][True]
    init, norms = one_p[0], one_p[1]
    expected_norms = 5 if config == "gpt" else 9  # 2 per layer + final (+ q and k per layer)
    assert norms == expected_norms and len(init) == norms
    for name, w in init.items():
        assert torch.equal(w, torch.zeros_like(w)), f"{name}: a 1p norm weight starts at zero"
    assert all(torch.equal(w, torch.ones_like(w)) for w in plain[0].values())
    torch.testing.assert_close(one_p[2], plain[2], rtol=1e-5, atol=1e-5)
    assert plain[3].keys() == one_p[3].keys()
    for name, g in plain[3].items():
        torch.testing.assert_close(one_p[3][name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_fpdt_with_layernorm_1p_equals_the_baseline_with_it():
    results = run_world(2, fpdt_worker)
    for config in CONFIGS:
        ref = baseline()[config][True]
        for result in results:
            losses, grads, sp_rank, num_chunks = result[config]
            expected = fpdt_shard(ref[2], dim=1, sp_rank=sp_rank, sp_size=2, num_chunks=num_chunks)
            torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{config}: {m}")
            assert grads.keys() == ref[3].keys()
            for name, g in ref[3].items():
                torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{config} {name}: {m}")


@pytest.mark.parametrize("saved_1p", [False, True])
def test_a_checkpoint_of_the_other_setting_is_refused_saying_how_to_convert(saved_1p):
    """Same shapes, norm weights 1 apart: refused before anything is built, in one line that says
    how to convert (through Hugging Face, whose import takes --apply-layernorm-1p)."""
    import dataclasses

    from megatron.training.checkpointing import CheckpointError, model_for_checkpoint
    from megatron.training.config import ModelConfig

    saved = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, apply_layernorm_1p=saved_1p)
    common = {"model_args": dataclasses.asdict(saved), "true_vocab_size": 64, "padded_vocab_size": 64}
    assert model_for_checkpoint(common, "ckpt", saved, 64, 1) == 64  # the same setting loads
    run = dataclasses.replace(saved, apply_layernorm_1p=not saved_1p)
    with pytest.raises(CheckpointError) as e:
        model_for_checkpoint(common, "ckpt", run, 64, 1)
    message = str(e.value)
    assert "\n" not in message
    assert f"--apply-layernorm-1p {saved_1p} (this run: {not saved_1p}; its norm weights differ" in message
    assert "by exactly 1" in message and "--saver hf" in message
    assert message.endswith(f"--loader hf{'' if saved_1p else ' --apply-layernorm-1p'}); give the flags it was "
                            f"trained with, or another --load")
    # a checkpoint from before the field existed is a plain one
    del common["model_args"]["apply_layernorm_1p"]
    assert model_for_checkpoint(common, "ckpt", saved if not saved_1p else run, 64, 1) == 64
