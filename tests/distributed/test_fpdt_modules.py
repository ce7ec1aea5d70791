"""The chunked MLP and the chunked logits+loss on their own (one gloo process).

Both must equal megatron-core's unchunked versions, forward and backward, and
never build the whole-sequence intermediate: the MLP's ``[s, ffn]`` activation
or the loss's ``[s, vocab]`` logits.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fpdt_ext.testing.spawn import run_world

S, B, H, FFN, V = 24, 2, 16, 40, 64


def _megatron(world_size):
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.training.initialize import set_seed

    from fpdt_ext.mcore import cpu_shims
    from fpdt_ext.mcore.parallel_state import initialize_fpdt_parallel

    cpu_shims.prepare()
    groups = initialize_fpdt_parallel(1, 1, 1)
    set_seed(1, tp_rank=0)
    return groups, TransformerConfig


def modules_worker(rank, world_size):
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.mlp import MLP

    from fpdt_ext.core.config import FPDTConfig
    from fpdt_ext.mcore.loss import chunked_lm_loss
    from fpdt_ext.mcore.mlp import FPDTMLP

    groups, TransformerConfig = _megatron(world_size)
    report = {}
    submodules = get_gpt_layer_local_spec().submodules.mlp.submodules
    for name, swiglu, bias in (("gelu_bias", False, True), ("swiglu_nobias", True, False)):
        config = TransformerConfig(num_layers=1, hidden_size=H, ffn_hidden_size=FFN, num_attention_heads=2,
                                   gated_linear_unit=swiglu, activation_func=F.silu if swiglu else F.gelu,
                                   add_bias_linear=bias, use_cpu_initialization=True, bias_activation_fusion=False,
                                   params_dtype=torch.float64)
        reference = MLP(config, submodules, tp_group=groups.tp)
        chunked = FPDTMLP(config, submodules, tp_group=groups.tp, fpdt_config=FPDTConfig(fpdt_num_chunks=4))
        chunked.load_state_dict(reference.state_dict())
        rows = []
        chunked.linear_fc1.register_forward_hook(lambda m, i, o: rows.append(o[0].shape[0]))
        x = torch.randn(S, B, H, dtype=torch.float64, requires_grad=True)
        out_ref, bias_ref = reference(x)
        out, bias_out = chunked(x)
        if bias:  # fc2's bias comes back separately (added later by bias-dropout-add)
            out_ref, out = out_ref + bias_ref, out + bias_out
        dout = torch.randn_like(out)
        grads_ref = torch.autograd.grad(out_ref, [x, *reference.parameters()], dout)
        # the chunked MLP's parameters get their gradients in .grad (one backward call per chunk,
        # as a reentrant checkpoint), not through torch.autograd.grad
        out.backward(dout)
        grads = [x.grad, *(p.grad for p in chunked.parameters())]
        report[name] = dict(
            out=(out - out_ref).abs().max().item(),
            bias_same=(bias_ref is None and bias_out is None) or torch.equal(bias_ref, bias_out),
            grads=max((a - b).abs().max().item() for a, b in zip(grads, grads_ref)),
            fc1_rows=sorted(set(rows)), fc1_calls=len(rows))

    # chunked loss vs float64 cross entropy on full logits; every GEMM recorded
    hidden = torch.randn(S, B, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, S))
    mask = (torch.rand(B, S) > 0.3).double()
    logits = torch.matmul(hidden, weight.t())  # [S, B, V], float64
    ref = -logits.log_softmax(-1).gather(-1, labels.t().unsqueeze(-1)).squeeze(-1).t()  # [B, S]
    ref_grads = torch.autograd.grad((ref * mask).sum(), [hidden, weight])
    for dtype in (torch.float64, torch.bfloat16):
        h, w = (t.detach().to(dtype).requires_grad_() for t in (hidden, weight))
        with GemmRecorder() as gemms:
            loss = chunked_lm_loss(h, w, labels, tp_group=groups.tp, num_chunks=3)
            grads = torch.autograd.grad((loss * mask).sum(), [h, w])
        rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
        report[f"loss_{str(dtype)[6:]}"] = dict(
            loss=rel(loss, ref), grads=max(rel(a, b) for a, b in zip(grads, ref_grads)),
            loss_dtype=loss.dtype, grad_dtypes={g.dtype for g in grads},
            gemm_operand_dtypes={d for _, dtypes in gemms for d in dtypes},
            largest_logits_rows=max(shape[0] for shape, _ in gemms if shape[-1] == V))
    return report


class GemmRecorder(TorchFunctionMode):
    """Records (output shape, operand dtypes) of every matrix product."""

    GEMMS = {"mm", "addmm", "matmul", "bmm", "baddbmm", "addmm_", "__matmul__"}

    def __enter__(self):
        self.calls = []
        super().__enter__()
        return self.calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in self.GEMMS:
            operands = [a for a in args if isinstance(a, torch.Tensor)][-2:]
            self.calls.append((tuple(out.shape), tuple(a.dtype for a in operands)))
        return out


@functools.lru_cache(maxsize=None)
def report():
    return run_world(1, modules_worker)[0]


@pytest.mark.parametrize("variant", ["gelu_bias", "swiglu_nobias"])
def test_chunked_mlp_equals_megatron_mlp_and_never_builds_the_whole_intermediate(variant):
    r = report()[variant]
    assert r["out"] < 1e-12 and r["grads"] < 1e-12, r
    assert r["bias_same"]
    assert r["fc1_rows"] == [S // 4], f"fc1 ran on {r['fc1_rows']} rows, not one chunk of {S // 4}"
    assert r["fc1_calls"] == 8, "4 chunks forward + 4 recomputed in backward"


def test_chunked_loss_equals_cross_entropy_without_full_logits():
    r = report()["loss_float64"]
    assert r["loss"] < 1e-12 and r["grads"] < 1e-12, r
    assert r["largest_logits_rows"] <= -(-S // 3) * B, "logits must exist one chunk at a time"


def test_chunked_loss_in_bf16_multiplies_in_bf16_and_sums_in_float32():
    """No float32 GEMM of upcast bf16 inputs (about 1/12 of bf16 speed on Hopper): every product
    takes bf16 operands; the loss is float32 and within bf16 precision of the float64 reference."""
    r = report()["loss_bfloat16"]
    assert r["gemm_operand_dtypes"] == {torch.bfloat16}, r
    assert r["loss_dtype"] == torch.float32 and r["grad_dtypes"] == {torch.bfloat16}
    assert r["loss"] < 1e-2 and r["grads"] < 2e-2, r


def test_loss_chunks_bound_the_logits_of_one_chunk():
    from fpdt_ext.core.config import MAX_CHUNK_LOGITS, MIN_CHUNK_TOKENS, loss_chunk_tokens, loss_chunks

    # 32K vocabulary: 131 tokens per chunk (16 MiB of float32 logits), whatever the attention chunk
    assert loss_chunk_tokens(32000) == MAX_CHUNK_LOGITS // 32000
    assert loss_chunks(8192, 32000) == -(-8192 // loss_chunk_tokens(32000))
    assert loss_chunks(8192, 32000, at_least=128) == 128  # never fewer than asked
    # a huge vocabulary still keeps enough tokens per chunk for an efficient weight-gradient GEMM
    assert loss_chunk_tokens(1 << 20) == MIN_CHUNK_TOKENS
    assert loss_chunks(100, 32000) == 1 and loss_chunks(3, 10**6) == 1  # short inputs: one chunk
    for tokens, vocab in ((8192, 32000), (65536, 128256), (1000, 50257)):
        chunks = loss_chunks(tokens, vocab)
        assert -(-tokens // chunks) <= loss_chunk_tokens(vocab)
