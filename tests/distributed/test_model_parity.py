"""The FPDT-spec model against megatron-core's local-spec GPTModel with the same weights.

Reference: one process, megatron-core's GPTModel with its local spec (its own
DotProductAttention, MLP and vocab-parallel cross entropy). FPDT: 2 processes
(FPDT 2) and 4 processes (TP 2 x FPDT 2), several chunks, offload on. Per-token
losses and every parameter gradient must match (float32), for a GPT config
(LayerNorm, GeLU, biases, learned positions, tied embeddings) and a Llama
config (RMSNorm, SwiGLU, no biases, RoPE, GQA, untied embeddings).

The FPDT runs also prove FPDT's hot paths use the process groups they were
given: megatron-core's global parallel-state getters are made to raise inside
FPDT attention (module forward, autograd forward and backward), the chunked
MLP's own code and the chunked loss (forward and backward). (megatron-core's
own linear layers still look up their default TP group; that is theirs.)
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from fpdt_ext.core.layout import fpdt_shard, fpdt_shard_batch
from fpdt_ext.testing.spawn import run_world

SEQ, BATCH, VOCAB = 48, 2, 96
COMMON = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "48",
          "--seq-length", str(SEQ), "--micro-batch-size", str(BATCH), "--train-iters", "1", "--mock-data",
          "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", "16", "--attention-dropout", "0",
          "--hidden-dropout", "0", "--seed", "7"]
CONFIGS = {
    "gpt": [],
    "llama": ["--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--position-embedding-type",
              "rope", "--rotary-base", "500000", "--group-query-attention", "--num-query-groups", "2",
              "--untie-embeddings-and-output-weights"],
}
# q/k layernorm: megatron-core's own SelfAttention forward (whole-sequence QKV) into FPDT core attention
CONFIGS["llama_qk_layernorm"] = CONFIGS["llama"] + ["--qk-layernorm"]
CHUNKED_QKV = {"gpt": True, "llama": True, "llama_qk_layernorm": False, "llama_rope_scaled": True, "llama_yarn": True}
# Scaled RoPE, at FPDT 2 only: Llama 3.1's scaling from an original context of 16 tokens (every
# FPDT chunk but the first lies past it) and linear interpolation on top; YaRN from 16 tokens
# (one frequency kept, one blended, two interpolated) with an attention factor of 1.039 (from
# mscale and mscale_all_dim), and the same YaRN with an attention factor of 1 (reference only)
YARN = ["--position-embedding-type", "yarn", "--rotary-scaling-factor", "4", "--yarn-original-max-position-embeddings",
        "16", "--yarn-beta-fast", "8", "--yarn-beta-slow", "0.05", "--no-yarn-correction-range-round-to-int"]
SCALED = {"llama_rope_scaled": CONFIGS["llama"] + ["--use-rope-scaling", "--rope-scaling-factor", "4",
                                                   "--rope-scaling-original-max-position-embeddings", "16",
                                                   "--rotary-seq-len-interpolation-factor", "2"],
          "llama_yarn": CONFIGS["llama"] + YARN + ["--mscale", "0.8", "--mscale-all-dim", "0.5"],
          "llama_yarn_unscaled": CONFIGS["llama"] + YARN + ["--mscale", "0", "--mscale-all-dim", "0"]}
FLAGS = {**CONFIGS, **SCALED}
FPDT = ["--fpdt", "--fpdt-chunk-size", "16", "--fpdt-offload"]  # 3 chunks of 16 tokens


def _batch():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    loss_mask = (torch.rand(BATCH, SEQ, generator=gen) > 0.2).float()
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask,
            "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous()}


def _setup(flags, world_size):
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.initialize import initialize

    args = validate_args(parse_args(COMMON + flags), world_size=world_size)
    return args, initialize(args)


def _full_grad(param, grad, groups):
    """The whole tensor from this rank's TP shard (gathered along its partition dim; a
    strided partition, e.g. SwiGLU's [gate; up] fc1, interleaves the shards' pieces)."""
    if not getattr(param, "tensor_model_parallel", False) or groups.layout.tensor_model_parallel_size == 1:
        return grad
    parts = [torch.empty_like(grad) for _ in range(groups.layout.tensor_model_parallel_size)]
    dist.all_gather(parts, grad.contiguous(), group=groups.tp)
    stride, dim = getattr(param, "partition_stride", 1), param.partition_dim
    pieces = [part.chunk(stride, dim=dim) for part in parts]
    return torch.cat([p[k] for k in range(stride) for p in pieces], dim=dim)


def reference_worker(rank, world_size, config):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.training.models import build_model

    args, groups = _setup(FLAGS[config], world_size)
    model = build_model(args, groups, VOCAB, layer_spec=get_gpt_layer_local_spec(
        normalization=args.model.normalization, qk_layernorm=args.model.qk_layernorm))
    batch = _batch()
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, S]
    (losses * batch["loss_mask"]).sum().div(batch["loss_mask"].sum()).backward()
    return {"losses": losses.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}


class _Forbidden:
    """megatron-core's global parallel-state getters, made to raise while active."""

    depth = 0
    calls = {}

    @classmethod
    def install(cls):
        from megatron.core import parallel_state

        for name in dir(parallel_state):
            fn = getattr(parallel_state, name)
            if name.startswith("get_") and callable(fn):
                def guarded(*args, _fn=fn, _name=name, **kwargs):
                    if cls.depth:
                        raise AssertionError(f"global getter parallel_state.{_name}() called in an FPDT hot path")
                    return _fn(*args, **kwargs)
                setattr(parallel_state, name, guarded)

    @classmethod
    def wrap(cls, owner, attr):
        fn = getattr(owner, attr)

        def forbidding(*args, **kwargs):
            key = f"{getattr(owner, '__name__', owner)}.{attr}"
            cls.calls[key] = cls.calls.get(key, 0) + 1
            cls.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                cls.depth -= 1
        setattr(owner, attr, staticmethod(forbidding) if isinstance(owner.__dict__.get(attr), staticmethod)
                else forbidding)


def _forbid_globals_in_fpdt_hot_paths():
    import fpdt_ext.core.attention as attention
    import fpdt_ext.mcore.loss as loss
    import fpdt_ext.mcore.model as model
    import fpdt_ext.core.qkv as qkv
    from fpdt_ext.mcore.attention import FPDTCoreAttention

    _Forbidden.install()
    _Forbidden.wrap(FPDTCoreAttention, "forward")
    _Forbidden.wrap(attention, "forward_chunks")
    _Forbidden.wrap(attention, "backward_chunks")
    _Forbidden.wrap(qkv.FPDTQKVAttentionFunction, "forward")
    _Forbidden.wrap(qkv.FPDTQKVAttentionFunction, "backward")
    _Forbidden.wrap(model, "chunked_lm_loss")
    _Forbidden.wrap(loss._ChunkedVocabParallelLoss, "backward")


def fpdt_worker(rank, world_size, config, tp):
    from megatron.training.models import build_model

    args, groups = _setup(FLAGS[config] + FPDT + ["--fpdt-parallel-size", "2", "--tensor-model-parallel-size",
                                                    str(tp)], world_size)
    model = build_model(args, groups, VOCAB)
    norm_calls = {"input": 0, "pre_mlp": 0}  # whole-sequence norm calls (the loops normalise chunks instead)
    for layer in model.decoder.layers:
        layer.input_layernorm.register_forward_hook(lambda *_: norm_calls.__setitem__("input", norm_calls["input"] + 1))
        layer.pre_mlp_layernorm.register_forward_hook(
            lambda *_: norm_calls.__setitem__("pre_mlp", norm_calls["pre_mlp"] + 1))
    full = _batch()
    batch = fpdt_shard_batch(full, sp_rank=groups.sp_rank, sp_size=2, num_chunks=args.fpdt_num_chunks)
    _forbid_globals_in_fpdt_hot_paths()
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, S/2]
    (losses * batch["loss_mask"]).sum().div(full["loss_mask"].sum()).backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad, group=groups.sp)  # each FPDT rank saw part of the tokens
        if "q_layernorm" in name or "k_layernorm" in name:  # each TP rank saw its own heads
            dist.all_reduce(grad, group=groups.tp)
        grads[name] = _full_grad(param, grad, groups)
    weights = {n: _full_grad(p, p.detach().clone(), groups) for n, p in model.named_parameters()}
    return {"losses": losses.detach(), "grads": grads, "weights": weights, "sp_rank": groups.sp_rank,
            "num_chunks": args.fpdt_num_chunks, "calls": dict(_Forbidden.calls),
            "norm_calls": norm_calls}


@functools.lru_cache(maxsize=None)
def reference(config):
    return run_world(1, reference_worker, config)[0]


@functools.lru_cache(maxsize=None)
def fpdt_run(config, tp):
    return run_world(2 * tp, fpdt_worker, config, tp)


@pytest.mark.parametrize("tp", [1, 2], ids=["fpdt2", "tp2xfpdt2"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_fpdt_model_matches_local_spec_gptmodel(config, tp):
    _check_parity(config, tp)


def test_fpdt_model_matches_local_spec_gptmodel_with_scaled_rope():
    """Rotary tables taken at the tokens' global positions (FPDTGPTModel._rotary_at) carry the
    scaling: the same losses and gradients as the baseline, which the scaling changes (by more than
    ten times the losses' tolerance, at these small initial weights)."""
    _check_parity("llama_rope_scaled", 1)
    assert (reference("llama_rope_scaled")["losses"] - reference("llama")["losses"]).abs().max() > 1e-4


def test_fpdt_model_matches_local_spec_gptmodel_with_yarn():
    """YaRN: rotary tables at the tokens' global positions, cos and sin scaled by its attention
    factor inside FPDT's chunk loop; the same losses and gradients as the baseline, which YaRN
    changes, and in which the attention factor alone changes the gradients by more than the
    tolerance (a missing factor would fail)."""
    _check_parity("llama_yarn", 1)
    yarn, llama, unscaled = reference("llama_yarn"), reference("llama"), reference("llama_yarn_unscaled")
    assert (yarn["losses"] - llama["losses"]).abs().max() > 1e-4
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert not torch.allclose(yarn["grads"][qkv], unscaled["grads"][qkv], rtol=1e-4, atol=1e-6)


def _check_parity(config, tp):
    ref = reference(config)
    for result in fpdt_run(config, tp):
        assert result["weights"].keys() == ref["weights"].keys(), "parameter names differ from the local spec"
        for name, w in ref["weights"].items():
            assert result["weights"][name].shape == w.shape, name
            assert torch.equal(result["weights"][name], w), f"{name}: initial weights differ"
        # every layer took the chunked QKV path (projection and rotary inside FPDT's loop), or the fallback
        calls = result["calls"]
        chunked = 2 if CHUNKED_QKV[config] else None
        assert calls.get("FPDTQKVAttentionFunction.forward") == chunked, calls
        assert calls.get("FPDTQKVAttentionFunction.backward") == chunked, calls
        assert calls.get("FPDTCoreAttention.forward") == (None if chunked else 2), calls
        # input norms run inside the QKV loop (on the whole sequence only for the fallback),
        # pre-MLP norms inside the MLP's chunks
        assert result["norm_calls"] == {"input": 0 if chunked else 2, "pre_mlp": 0}, result["norm_calls"]
        expected = fpdt_shard(ref["losses"], dim=1, sp_rank=result["sp_rank"], sp_size=2,
                              num_chunks=result["num_chunks"])
        torch.testing.assert_close(result["losses"], expected, rtol=1e-5, atol=1e-5)
        for name, g in ref["grads"].items():
            torch.testing.assert_close(result["grads"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


RECOMPUTE = {
    "none": [],
    "uniform-1": ["--recompute-granularity", "full"],
    "block-1": ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"],
    "uniform-2": ["--recompute-granularity", "full", "--recompute-num-layers", "2"],
}


def recompute_worker(rank, world_size, setting):
    """One FPDT process, 3 chunks, hidden dropout on: gradients and the MLP's fc1 calls."""
    from megatron.training.initialize import set_seed
    from megatron.training.models import build_model

    args, groups = _setup(CONFIGS["llama"] + FPDT + ["--fpdt-parallel-size", "1", "--hidden-dropout", "0.2"]
                          + RECOMPUTE[setting], world_size)
    model = build_model(args, groups, VOCAB)
    calls = []
    for i, layer in enumerate(model.decoder.layers):
        layer.mlp.linear_fc1.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    batch = _batch()
    set_seed(11, tp_rank=0)  # the same dropout streams in every setting
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    (losses * batch["loss_mask"]).sum().backward()
    return {"grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "fc1_calls": [calls.count(i) for i in range(len(model.decoder.layers))],
            "num_chunks": args.fpdt_num_chunks}


@functools.lru_cache(maxsize=None)
def recompute_run(setting):
    return run_world(1, recompute_worker, setting)[0]


@pytest.mark.parametrize("setting", ["uniform-1", "block-1", "uniform-2"])
def test_full_recompute_runs_the_chunked_mlp_forward_twice_with_the_same_gradients(setting):
    """Under full recompute the MLP of a layer checkpointed alone is not run in the recompute pass
    (its output only roots the backward): 2 forwards per chunk per step, as without recompute,
    not 3. With two layers per checkpoint the first layer's output is read by the second, so both
    run it. Gradients (hidden dropout on, replayed) equal those without recompute."""
    base, run = recompute_run("none"), recompute_run(setting)
    u = run["num_chunks"]
    assert base["fc1_calls"] == [2 * u, 2 * u]
    assert run["fc1_calls"] == {"uniform-1": [2 * u, 2 * u], "block-1": [2 * u, 2 * u],
                                "uniform-2": [3 * u, 3 * u]}[setting]
    for name, g in base["grads"].items():
        torch.testing.assert_close(run["grads"][name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
