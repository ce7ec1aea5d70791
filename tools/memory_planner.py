#!/usr/bin/env python
"""Predict per-GPU device memory and host memory of a training run before queueing it.

    python tools/memory_planner.py --preset llama3-8b --gpus 4 --fpdt 4 --gpu-mem-gib 80 --host-mem-gib 1000 \\
        --seq-length 2097152 --chunk-size 65536
    python tools/memory_planner.py --preset llama3-70b --gpus 32 --tp 8 --fpdt 4 --gpu-mem-gib 141 \\
        --host-mem-gib 2000 --seq-length 4194304

For the model (a preset or shape flags), layout (TP x FPDT x PP x DP over --gpus), chunk size and
offload setting it prints the device and host bytes per GPU at --seq-length broken into
terms, which term dominates, the longest trainable sequence under the device and host
limits, and a recommended chunk size. ``--baseline`` plans megatron-core's standard spec
instead (TP only, full recompute, whole-sequence logits). ``--device cpu`` plans this
project's CPU runs (float32, everything in one RAM, HostAdamW), which is how the model
is validated against measurements (bench/max_seq.py; docs/BENCHMARKS.md).

The model counts the tensors the implementation keeps (see each term's comment):
parameters, fp32 gradient buffer and Adam state (sharded over data x FPDT ranks with the
distributed optimizer); full recompute, so one layer input per layer is kept (on the host
with --offload-recompute-inputs) and one layer's working set exists at a time. A step has
two peaks and the larger one counts: the backward of the logits + loss (whole-sequence
logits for the baseline, one loss chunk for FPDT) and the backward of one recomputed layer
(FPDT keeps a few whole-local-sequence tensors there: the layer's residual and norm output,
the QKV input gradient and residual-stream gradients, plus its stored attention chunks,
which go to the host with offload; q/k/v, rotary and norm temporaries are chunk-sized).
With pipeline stages (``--pp``, ``--vp``, ``--microbatches``) a GPU holds one stage's share of
the model state (its layers and one vocabulary matrix), the loss backward is the last stage's
and the layer backward's peak the first stage's, which holds its layers' checkpointed inputs
for every micro batch in flight (min(PP, M) under 1F1B; measured: tests/distributed/test_pipeline.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fpdt_ext.core.config import FPDTConfig, check_heads, loss_chunk_tokens  # noqa: E402
from megatron.training.config import SHARDING_STRATEGIES  # noqa: E402
from megatron.training.flops import parameter_count  # noqa: E402

PRESETS = {
    # name: (layers, hidden, ffn, heads, kv_heads, vocab, gated, tied)
    "gpt-2.7b": (32, 2560, 10240, 32, 32, 50304, False, True),
    "llama3.2-1b": (16, 2048, 8192, 32, 8, 128256, True, True),
    "llama3-8b": (32, 4096, 14336, 32, 8, 128256, True, False),
    "llama3-70b": (80, 8192, 28672, 64, 8, 128256, True, False),
    "llama-tiny": (4, 256, 688, 8, 4, 32000, True, False),
}
GiB = 2**30


@dataclasses.dataclass
class Model:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    gated: bool
    tied: bool

    @property
    def head_dim(self):
        return self.hidden // self.heads


@dataclasses.dataclass
class Plan:
    model: Model
    gpus: int
    tp: int = 1
    fpdt: int = 1
    chunk_size: int = 65536
    offload: bool = True
    offload_checkpoints: bool = True
    baseline: bool = False
    device: str = "cuda"
    distributed_optimizer: bool = True
    fsdp: bool = False  # --use-torch-fsdp2: parameters, gradients and optimizer state sharded over data x FPDT
    # --use-megatron-fsdp's --data-parallel-sharding-strategy ("" without it): Megatron-FSDP on GPUs
    megatron_fsdp: str = ""
    disk: bool = False  # --offload-dir: what offload moves off the device goes to a file, not host memory
    pp: int = 1  # pipeline stages (megatron-core's schedules)
    vp: int = 1  # virtual stages per pipeline rank (the interleaved schedule)
    microbatches: int = 0  # per iteration and data-parallel rank; 0: the pipeline's size (the fewest that fill it)

    @property
    def dp(self):
        return self.gpus // (self.tp * self.fpdt * self.pp)

    def held_layer_inputs(self, stage: str) -> float:
        """Checkpointed layer inputs a stage holds at its peak: its layers' for each micro batch in
        flight. Under 1F1B the first stage has min(PP, M) micro batches in flight and the last one;
        under the interleaved schedule the first rank's warm-up is megatron-core's (PP - 1) x 2 +
        (V - 1) x PP micro-batch chunks (plus the one computing), each of L / (PP x V) layers."""
        m = self.model.layers
        if self.pp == 1:
            return m
        micro = self.microbatches or self.pp
        if stage == "last":
            return m / self.pp / self.vp
        if self.vp == 1:
            return min(self.pp, micro) * m / self.pp
        in_flight = min((self.pp - 1) * 2 + (self.vp - 1) * self.pp + 1, micro * self.vp)
        return in_flight * m / (self.pp * self.vp)

    @property
    def act_bytes(self):
        return 4 if self.device == "cpu" else 2  # float32 on the CPU, bf16 on GPUs

    def params_per_rank(self):
        """The training code's count (megatron/training/flops.py); all but the norms split over TP.
        Under a pipeline, the larger of the first and last stage's: its share of the layers and one
        vocabulary matrix (the embedding on the first, the output layer, or a tied embedding's copy,
        on the last)."""
        total = self.model_params()
        if self.pp == 1:
            return total
        return self.layer_params() * self.model.layers / self.pp + self.stage_root_params()

    def model_params(self):
        """The whole model's parameters on one TP rank."""
        m = self.model
        total = parameter_count(num_layers=m.layers, hidden_size=m.hidden, num_heads=m.heads, num_kv_heads=m.kv_heads,
                                head_dim=m.head_dim, ffn_hidden_size=m.ffn, vocab_size=m.vocab, gated=m.gated,
                                tied=m.tied)
        norms = (2 * m.layers + 1) * m.hidden
        return (total - norms) / self.tp + norms

    def layer_params(self):
        """Parameters of one transformer layer."""
        return (self.model_params() - self.root_params()) / self.model.layers

    def root_params(self):
        m = self.model
        return m.vocab * m.hidden * (1 if m.tied else 2) / self.tp + m.hidden

    def stage_root_params(self):
        """What is not a transformer layer on the largest stage: all of it without a pipeline; with
        one, a vocabulary matrix and a norm (the first stage's embedding, the last's output layer
        or tied copy, and its final norm)."""
        if self.pp == 1:
            return self.root_params()
        m = self.model
        return m.vocab * m.hidden / self.tp + m.hidden

    def static_terms(self):
        """(name, device bytes, host bytes, disk bytes) of what does not depend on the sequence length."""
        n = self.params_per_rank()
        runtime = ("runtime buffers", self.RUNTIME[self.device], 0, 0)
        if self.megatron_fsdp and self.device == "cuda":
            return self._megatron_fsdp_terms(n) + [runtime]
        if self.fsdp or self.megatron_fsdp in ("optim_grads", "optim_grads_params"):  # (the CPU's equivalent)
            return self._fsdp_terms(n) + [runtime]
        shard = self.dp * self.fpdt if self.distributed_optimizer or self.megatron_fsdp else 1
        if self.device == "cpu":  # fp32 params and grad buffer; HostAdamW's moments split by whole
            # tensors (ZeRO-1), about 1/shard of them on each rank
            return [("parameters (fp32)", 4 * n, 0, 0), ("gradient buffer (fp32)", 4 * n, 0, 0),
                    ("Adam moments (fp32)", 8 * n / shard, 0, 0), runtime]
        return [("parameters (bf16)", 2 * n, 0, 0), ("gradient buffer (fp32)", 4 * n, 0, 0),
                ("fp32 master + Adam moments", 12 * n / shard, 0, 0), runtime]

    def _fsdp_terms(self, n):
        """FSDP2 (megatron/training/sharding.py) over N = data x FPDT ranks: float32 shards of the
        parameters (the master weights), of the gradients and of Adam's moments, 1/N each
        (measured: bench/sharding_memory.py); plus what is gathered: two layers at a time in the
        compute dtype (the one computing, the one prefetched), one layer's unsharded gradient
        before its reduce-scatter (compute dtype and float32), and the root unit (embeddings,
        output layer, final norm), which FSDP2 keeps gathered from its forward to its backward.
        The root's unsharded gradients are not a term of their own: the output layer's is the
        loss backward's "output-layer weight gradient", and the embedding's exists only at the
        end of the backward, when the activations are gone. (Measured on llama-tiny, whose
        embeddings are 85% of it: the sharded state saves what the gathered root costs, 351 MiB
        against 360 unsharded at 8K tokens; docs/BENCHMARKS.md.)"""
        shard = self.dp * self.fpdt
        layer, root = self.layer_params(), self.stage_root_params()  # with stages, each its own root
        a = self.act_bytes
        return [("fp32 parameter shards (master weights)", 4 * n / shard, 0, 0),
                ("fp32 gradient shards", 4 * n / shard, 0, 0),
                ("Adam moments (fp32 shards)", 8 * n / shard, 0, 0),
                ("FSDP gathered layers (current + prefetched)", 2 * a * layer, 0, 0),
                ("FSDP layer gradient before reduce-scatter", (a + 4) * layer, 0, 0),
                ("FSDP root unit gathered (embeddings, output)", a * root, 0, 0)]

    def _megatron_fsdp_terms(self, n):
        """megatron-core's Megatron-FSDP (megatron/training/megatron_fsdp.py) over N = data x FPDT
        ranks, by its buffers: bf16 model weights (whole, or 1/N with optim_grads_params), float32
        master weights and Adam's moments (1/N), float32 gradients (whole with optim, 1/N
        otherwise). Transient, as FSDP2's: with sharded gradients one layer's float32 gradient
        bucket before its reduce-scatter; with sharded parameters two layers gathered in bf16 (the
        one computing, the one prefetched) and the root unit (embeddings, output layer, final norm).
        The planner's accounting of its code, not measured on a GPU."""
        shard, layer, root = self.dp * self.fpdt, self.layer_params(), self.stage_root_params()
        strategy = self.megatron_fsdp
        params = n / shard if strategy == "optim_grads_params" else n
        terms = [(f"bf16 model weights{' (shards)' if strategy == 'optim_grads_params' else ''}", 2 * params, 0, 0),
                 ("fp32 master weights + Adam moments (shards)", 12 * n / shard, 0, 0)]
        if strategy == "optim":
            return terms + [("gradient buffer (fp32)", 4 * n, 0, 0)]
        terms += [("fp32 gradient shards", 4 * n / shard, 0, 0),
                  ("gradient bucket before reduce-scatter (fp32, one layer)", 4 * layer, 0, 0)]
        if strategy == "optim_grads_params":
            terms += [("gathered layers (current + prefetched, bf16)", 2 * 2 * layer, 0, 0),
                      ("root unit gathered (embeddings, output, bf16)", 2 * root, 0, 0)]
        return terms

    def loss_rows(self):
        """Tokens per rank in one loss chunk, as the chunked loss sizes them."""
        return loss_chunk_tokens(self.model.vocab // self.tp)

    # Whole-local-sequence tensors at the two peaks of a step, in units of [tokens, hidden] of the
    # activation dtype, beyond the checkpointed layer inputs. Calibrated on CPU measurements of
    # llama-tiny (bench/max_seq.py, 2 processes) and checked on a second shape (docs/BENCHMARKS.md).
    #  - "loss": the backward of the logits + loss: the last layer's output, the final norm's
    #    saved tensors, the loss input and its gradient;
    #  - "layer": the backward of one recomputed layer: the layer's mid residual, its
    #    attention output, the QKV or MLP input gradient, the residual-stream gradients and
    #    communication buffers (FPDT normalises, projects q/k/v and runs the MLP inside its
    #    chunk loops, so no norm output, q/k/v or MLP intermediate exists for the whole
    #    sequence). FPDT's stored attention chunks are counted separately (they move to the host
    #    with offload).
    FINAL_STATES = {"baseline": 4.5, "fpdt": 4.75}
    LAYER_WORKING = {"baseline": 3.6, "fpdt": 3.6}  # baseline: FPDT's value, never binding (logits)
    # What the runtime adds beside tensors: allocator and communication buffers (measured on the
    # CPU); on GPUs an allowance for the CUDA context, NCCL buffers and fragmentation (not measured).
    RUNTIME = {"cpu": 30 * 2**20, "cuda": 2 * GiB}
    # With the disk tier on the CPU the resident set grows by 6.65 units per local token at the
    # layer backward's peak (llama-tiny, 24K-37K tokens), of which the census finds 4.6 as live
    # tensors (working set and the dout chunks); the rest is not itemised (allocator and buffers
    # of the chunks read back). Calibrated there, not yet checked on a second shape.
    DISK_CPU_EXTRA = 2.05

    def attention_store_bytes(self):
        """Bytes per local token of FPDT's stored attention chunks during a layer's backward: q,
        out, dout and the float32 dq accumulator (heads), k and v (KV heads, replicated up to the
        FPDT size), float32 logsumexp."""
        m, a, t = self.model, self.act_bytes, self.tp
        heads, kv = m.heads / t, max(m.kv_heads / t, self.fpdt)
        return (a * (3 * heads + 2 * kv) + 4 * heads) * m.head_dim + 4 * heads

    def dout_chunk_bytes(self):
        """Bytes per local token of the dout chunks, which are received into the output gradient's
        own storage and so stay on the device when the other stored chunks are offloaded."""
        return self.act_bytes * self.model.heads / self.tp * self.model.head_dim

    def phase_terms(self, seq):
        """{phase: [(name, device bytes, host bytes, disk bytes)]} of what grows with the sequence
        (batch 1). Offloaded terms go to the host, or to disk with ``disk``; on the CPU the host
        is the device's RAM, so only the disk takes anything off it."""
        m, a, t = self.model, self.act_bytes, self.tp
        host_split = self.device != "cpu"  # on the CPU the host buffers are the same RAM
        offloads = host_split or self.disk  # offloading takes something off the device
        n = seq / (1 if self.baseline else self.fpdt)  # tokens per rank
        h = m.hidden
        kind = "baseline" if self.baseline else "fpdt"

        def term(name, nbytes, on_host=False):
            if on_host and self.disk:
                return (name, 0, 0, nbytes)
            host = on_host and host_split
            return (name, 0 if host else nbytes, nbytes if host else 0, 0)

        def inputs(stage):
            return [term("checkpointed layer inputs", self.held_layer_inputs(stage) * n * h * a,
                         on_host=self.offload_checkpoints)]

        # the stages' sends and receives: an output and an input gradient per stage boundary
        p2p = [term("pipeline send/receive buffers", 2 * n * h * a)] if self.pp > 1 else []
        loss = [term("final hidden states, loss input and gradient", self.FINAL_STATES[kind] * n * h * a),
                term("output-layer weight gradient (fp32)", m.vocab / t * h * 4)]
        if self.baseline:  # whole-sequence logits; on GPUs bf16 logits + fp32 softmax/gradient
            loss.append(term("logits and softmax", n * m.vocab / t * (4 if self.device == "cpu" else 8)))
        else:  # one chunk of fp32 logits (softmax in place)
            loss.append(term("loss chunk logits (fp32)", min(n, self.loss_rows()) * m.vocab / t * 4))
        layer = [term("layer working set and gradients", self.LAYER_WORKING[kind] * n * h * a)]
        if self.disk and self.device == "cpu":
            layer.append(term("disk tier: resident growth beyond tensors", self.DISK_CPU_EXTRA * n * h * a))
        if not self.baseline:  # one MLP chunk recomputed in backward: fc1 output, activation, their grads
            chunk_rows = min(seq, self.chunk_size) / self.fpdt
            layer.append(term("MLP chunk intermediates (resident)",
                              chunk_rows * m.ffn / t * a * (6 if m.gated else 4)))
            stored = self.attention_store_bytes()
            if self.offload and offloads:
                dout = self.dout_chunk_bytes()
                layer += [term(f"FPDT attention chunks ({'disk' if self.disk else 'host'})", n * (stored - dout),
                               on_host=True),
                          term("FPDT dout chunks (in the output gradient's storage)", n * dout),
                          term("FPDT attention chunks (resident: 2 of each kind)", 2 * chunk_rows * stored)]
            else:
                layer.append(term("FPDT attention chunks", n * stored))
        if self.pp == 1:
            return {"loss backward": inputs("first") + loss, "layer backward": inputs("first") + layer}
        # the loss is the last stage's; the first stage holds the most checkpointed inputs
        return {"loss backward, last stage": inputs("last") + loss + p2p,
                "layer backward, first stage": inputs("first") + layer + p2p}

    def peak_phase(self, seq, phases=None):
        """The phase whose device memory is the step's peak at ``seq`` tokens."""
        phases = phases or self.phase_terms(seq)
        return max(phases, key=lambda k: sum(x[1] for x in phases[k]))

    def totals(self, seq):
        """(device bytes, host bytes, terms) at the step's peak: the larger of the two phases."""
        static = self.static_terms()
        phases = self.phase_terms(seq)
        name = self.peak_phase(seq, phases)
        terms = static + [(f"{t[0]} [{name}]", *t[1:]) for t in phases[name]]
        # host buffers of either phase persist (pools), so host use is the larger of the two
        host = sum(x[2] for x in static) + max(sum(x[2] for x in p) for p in phases.values())
        return sum(x[1] for x in terms), host, terms

    def max_sequence(self, device_limit, host_limit):
        """Longest sequence (a multiple of the chunk size, or 1024 for the baseline) under both limits."""
        step = 1024 if self.baseline else self.chunk_size
        lo, hi = 0, 1
        while self.fits(hi * step, device_limit, host_limit) and hi < 1 << 24:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.fits(mid * step, device_limit, host_limit) else (lo, mid)
        return lo * step

    def fits(self, seq, device_limit, host_limit):
        if not self.baseline and seq % self.chunk_size:
            return False
        dev, host, _ = self.totals(seq)
        return dev <= device_limit and host <= host_limit


def recommend_chunk(plan: Plan, seq: int, device_limit: float, host_limit: float) -> int:
    """The largest chunk (fewer, bigger kernels) whose working set leaves the run within limits:
    chunk-sized terms (loss, MLP, resident attention chunks) stay under 10% of the device limit."""
    best = None
    for chunk in (2**k for k in range(12, 23)):
        if chunk > seq or seq % chunk or chunk % plan.fpdt:
            continue
        trial = dataclasses.replace(plan, chunk_size=chunk)
        dev, host, terms = trial.totals(seq)
        chunk_bytes = sum(t[1] for t in terms if "resident" in t[0] or "loss chunk" in t[0])
        if dev <= device_limit and host <= host_limit and chunk_bytes <= 0.1 * device_limit:
            best = chunk
    return best


def _positive(kind):
    """An argparse type: a number above zero."""
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


# The training configuration's names in the checks shared with it, as this tool's flags.
_FLAGS = {"tensor_model_parallel_size*fpdt_parallel_size": "--tp x --fpdt", "tensor_model_parallel_size": "--tp",
          "num_attention_heads": "--heads", "num_query_groups": "--kv-heads", "fpdt_parallel_size": "--fpdt",
          "fpdt_chunk_size": "--chunk-size", "sequence length": "--seq-length"}


def check_layout(model: Model, plan: Plan, seq_length=None) -> None:
    """The training run's own checks of heads, chunks and sequence against the layout (ValueError)."""
    if model.hidden % model.heads:
        raise ValueError(f"--hidden {model.hidden} is not divisible by --heads {model.heads}")
    if model.ffn % plan.tp:
        raise ValueError(f"--ffn {model.ffn} is not divisible by --tp {plan.tp}")
    check_heads(model.heads, model.kv_heads, sp_size=plan.fpdt, tp_size=plan.tp)
    if not plan.baseline:
        fpdt = FPDTConfig(fpdt_parallel_size=plan.fpdt, fpdt_chunk_size=plan.chunk_size)
        if seq_length is not None:
            fpdt.num_chunks(seq_length)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    positive_int, positive_float = _positive(int), _positive(float)
    p.add_argument("--preset", choices=sorted(PRESETS))
    for name in ("layers", "hidden", "ffn", "heads", "kv-heads", "vocab"):
        p.add_argument(f"--{name}", type=positive_int)
    p.add_argument("--gpus", type=positive_int, required=True)
    p.add_argument("--tp", type=positive_int, default=1)
    p.add_argument("--fpdt", type=positive_int, default=1, help="FPDT parallel size")
    p.add_argument("--chunk-size", type=positive_int, default=65536)
    p.add_argument("--no-offload", action="store_true")
    p.add_argument("--no-offload-checkpoints", action="store_true")
    p.add_argument("--disk", action="store_true",
                   help="offload to a file (--offload-dir) instead of host memory: the offloaded terms "
                        "are counted as disk bytes")
    p.add_argument("--baseline", action="store_true", help="plan megatron-core's standard spec instead")
    p.add_argument("--no-distributed-optimizer", action="store_true",
                   help="optimizer state not split over the data x FPDT ranks (--use-distributed-optimizer off)")
    p.add_argument("--use-torch-fsdp2", action="store_true",
                   help="parameters, gradients and optimizer state sharded over the data x FPDT ranks (FSDP2)")
    p.add_argument("--use-megatron-fsdp", action="store_true",
                   help="megatron-core's Megatron-FSDP over the data x FPDT ranks, sharding what "
                        "--data-parallel-sharding-strategy says")
    p.add_argument("--data-parallel-sharding-strategy", choices=SHARDING_STRATEGIES[1:],  # all but no_shard
                   default="optim_grads_params")
    p.add_argument("--pp", type=positive_int, default=1, help="pipeline stages")
    p.add_argument("--vp", type=positive_int, default=1, help="virtual stages per pipeline rank (interleaved)")
    p.add_argument("--microbatches", type=positive_int, default=None,
                   help="micro batches per iteration and data-parallel rank (default: --pp, the fewest that fill "
                        "the pipeline); the first stage holds up to --pp of them in flight")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--gpu-mem-gib", type=positive_float, default=80.0)
    p.add_argument("--host-mem-gib", type=positive_float, default=1000.0, help="host memory per node")
    p.add_argument("--gpus-per-node", type=positive_int, default=8)
    p.add_argument("--seq-length", type=positive_int, default=None)
    a = p.parse_args(argv)
    if a.preset:
        model = Model(*PRESETS[a.preset])
    elif all(getattr(a, k) for k in ("layers", "hidden", "ffn", "heads", "vocab")):
        model = Model(a.layers, a.hidden, a.ffn, a.heads, a.kv_heads or a.heads, a.vocab, True, False)
    else:
        p.error("give --preset or all of --layers --hidden --ffn --heads --vocab")
    if a.gpus % (a.tp * a.fpdt * a.pp):
        p.error(f"--gpus {a.gpus} is not divisible by --tp x --fpdt x --pp = {a.tp * a.fpdt * a.pp}")
    if model.layers % (a.pp * a.vp):
        p.error(f"the model's {model.layers} layers do not split over --pp {a.pp} x --vp {a.vp} stages evenly")
    if a.use_megatron_fsdp and (a.pp > 1 or a.use_torch_fsdp2):
        p.error("--use-megatron-fsdp is planned (and run) without --pp or --use-torch-fsdp2: megatron-core 0.16's "
                "Megatron-FSDP has no pipeline axis (--use-torch-fsdp2 composes with stages)")
    # the baseline is megatron-core's own: its layer checkpoints stay on the device
    plan = Plan(model, a.gpus, a.tp, 1 if a.baseline else a.fpdt, a.chunk_size, not a.no_offload,
                not (a.no_offload_checkpoints or a.baseline), a.baseline, a.device,
                distributed_optimizer=not a.no_distributed_optimizer, disk=a.disk, fsdp=a.use_torch_fsdp2, pp=a.pp,
                vp=a.vp, microbatches=a.microbatches or 0,
                megatron_fsdp=a.data_parallel_sharding_strategy if a.use_megatron_fsdp else "")
    try:
        check_layout(model, plan, a.seq_length)
    except ValueError as e:
        p.error(re.sub("|".join(map(re.escape, _FLAGS)), lambda m: _FLAGS[m[0]], str(e)))
    device_limit = a.gpu_mem_gib * GiB
    host_limit = a.host_mem_gib * GiB / min(a.gpus_per_node, a.gpus)
    # with nothing that fits, the plan at the shortest sequence shows why
    seq = a.seq_length or plan.max_sequence(device_limit, host_limit) or (1024 if a.baseline else plan.chunk_size)
    dev, host, terms = plan.totals(seq)
    name = "baseline (megatron-core standard spec)" if a.baseline else f"FPDT {plan.fpdt}, chunk {plan.chunk_size}"
    print(f"{a.preset or 'model'}: {plan.model_params() * a.tp / 1e9:.2f}B parameters; {a.gpus} GPUs = TP {a.tp} x "
          f"FPDT {plan.fpdt} x {f'PP {plan.pp} x ' if plan.pp > 1 else ''}DP {plan.dp}; {name}; offload "
          f"{'on' if plan.offload else 'off'}"
          + (f"; {plan.vp} virtual stages per rank" if plan.vp > 1 else "")
          + (f"; {plan.microbatches or plan.pp} micro batches per iteration" if plan.pp > 1 else "")
          + f"{'; FSDP2 over ' + str(plan.fpdt * plan.dp) + ' ranks' if plan.fsdp else ''}"
          + (f"; Megatron-FSDP {plan.megatron_fsdp} over {plan.fpdt * plan.dp} ranks" if plan.megatron_fsdp else "")
          + f"{' (to disk)' if plan.disk else ''}")
    print(f"at {seq} tokens, per GPU: device {dev / GiB:.1f} GiB of {a.gpu_mem_gib:g}, host {host / GiB:.1f} GiB "
          f"of {host_limit / GiB:.0f}")
    disk = sum(t[3] for t in terms)
    if plan.disk:
        print(f"  and {disk / GiB:.1f} GiB on disk per GPU (the offload file's peak)")
    for term, d_bytes, h_bytes, k_bytes in sorted(terms, key=lambda t: -(t[1] + t[2] + t[3])):
        print(f"  {term:<40} device {d_bytes / GiB:9.2f} GiB   host {h_bytes / GiB:9.2f} GiB"
              + (f"   disk {k_bytes / GiB:9.2f} GiB" if plan.disk else ""))
    top = max(terms, key=lambda t: t[1])
    print(f"dominant device term: {top[0]} ({100 * top[1] / max(dev, 1):.0f}% of device memory)")
    longest = plan.max_sequence(device_limit, host_limit)
    print(f"longest trainable sequence: {longest} tokens"
          + ("" if plan.fits(seq, device_limit, host_limit) else f"  ({seq} tokens do NOT fit)"))
    if not a.baseline:
        chunk = recommend_chunk(plan, seq, device_limit, host_limit)
        print(f"recommended chunk size at {seq} tokens: {chunk if chunk else 'none fits'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
