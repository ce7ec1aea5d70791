"""tools/memory_planner.py: its arithmetic, and (slow) its predictions against measured CPU runs."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tools.memory_planner import GiB, PRESETS, Model, Plan


@pytest.mark.parametrize("preset,billions", [("llama3-8b", 8.03), ("llama3-70b", 70.55), ("llama3.2-1b", 1.24)])
def test_parameter_counts_are_the_published_ones(preset, billions):
    plan = Plan(Model(*PRESETS[preset]), gpus=1)
    assert plan.params_per_rank() / 1e9 == pytest.approx(billions, abs=0.01)
    assert Plan(Model(*PRESETS[preset]), gpus=8, tp=8).params_per_rank() < plan.params_per_rank() / 7


@pytest.mark.parametrize("preset", ["llama3.2-1b", "llama-tiny"])
def test_the_benchmarks_train_the_planners_model(preset):
    """bench/train_step.py's model flags (the GPU sweep's Llama-3.2-1B: tied embeddings, 1.24B) have
    the parameters of the planner's preset of the same name, so their figures can be compared."""
    from bench.train_step import VOCAB, model_config
    from megatron.training.flops import count_parameters

    model = model_config(preset, 4096)
    plan = Plan(Model(*PRESETS[preset]), gpus=1)
    assert count_parameters(model, VOCAB[preset]) == pytest.approx(plan.params_per_rank(), rel=1e-3)
    assert (not model.untie_embeddings_and_output_weights) == PRESETS[preset][-1]
    assert (model.num_layers, model.hidden_size, VOCAB[preset]) == (PRESETS[preset][0], PRESETS[preset][1],
                                                                    PRESETS[preset][5])


def test_fpdt_and_offload_move_memory_off_the_device():
    model = Model(*PRESETS["llama3-8b"])
    seq = 2 ** 21
    fpdt = Plan(model, gpus=4, fpdt=4, chunk_size=65536)
    no_offload = Plan(model, gpus=4, fpdt=4, chunk_size=65536, offload=False, offload_checkpoints=False)
    baseline = Plan(model, gpus=4, tp=4, baseline=True, offload_checkpoints=False)
    dev, host, _ = fpdt.totals(seq)
    dev_no, host_no, _ = no_offload.totals(seq)
    assert dev < dev_no and host > host_no == 0
    assert baseline.totals(seq)[0] > 5 * dev  # whole-sequence logits
    # on 141 GB cards (H200) FPDT fits 2M tokens; on 80 GB the model state alone (~71 GB) leaves too little
    assert fpdt.fits(seq, 141 * GiB, 250 * GiB) and not fpdt.fits(seq, 80 * GiB, 250 * GiB)
    longest = fpdt.max_sequence(141 * GiB, 250 * GiB)
    assert fpdt.fits(longest, 141 * GiB, 250 * GiB) and not fpdt.fits(longest + 65536, 141 * GiB, 250 * GiB)
    assert longest >= 16 * baseline.max_sequence(141 * GiB, 250 * GiB)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_disk_tier_takes_the_offloaded_terms_off_device_and_host(device):
    """--disk (--offload-dir): the checkpointed inputs and the stored attention chunks are counted
    on disk, in neither RAM nor device memory; on the CPU that is what lowers the device figure."""
    model = Model(*PRESETS["llama-tiny" if device == "cpu" else "llama3-8b"])
    seq = 65536 if device == "cpu" else 2 ** 21
    kw = dict(gpus=2 if device == "cpu" else 4, fpdt=2 if device == "cpu" else 4, chunk_size=1024 if device == "cpu"
              else 65536, device=device)
    ram, disk = Plan(model, **kw), Plan(model, disk=True, **kw)
    layer_ram, layer_disk = ram.phase_terms(seq)["layer backward"], disk.phase_terms(seq)["layer backward"]
    moved = {t[0]: t[3] for t in layer_disk if t[3]}
    assert set(moved) == {"checkpointed layer inputs", "FPDT attention chunks (disk)"}
    n = seq / kw["fpdt"]
    assert moved["checkpointed layer inputs"] == model.layers * n * model.hidden * ram.act_bytes
    # the dout chunks stay: they are received into the output gradient's storage
    assert moved["FPDT attention chunks (disk)"] == n * (ram.attention_store_bytes() - ram.dout_chunk_bytes())
    dev_ram, host_ram, _ = ram.totals(seq)
    dev_disk, host_disk, _ = disk.totals(seq)
    if device == "cpu":  # the host is the device's RAM: only the disk takes anything off it
        assert dev_disk < dev_ram and host_disk == host_ram == 0
        assert disk.max_sequence(GiB, GiB) > ram.max_sequence(GiB, GiB)
    else:  # offload already took them off the device; the disk takes them off the host
        assert sum(t[1] for t in layer_disk) == pytest.approx(sum(t[1] for t in layer_ram))
        assert host_disk < host_ram


def test_distributed_optimizer_splits_adam_state_over_data_x_fpdt_on_the_cpu():
    """HostAdamW's ZeRO-1 split (bench runs pass --use-distributed-optimizer): the CPU plan's
    Adam moments shrink by the data x FPDT size; parameters and gradients do not."""
    model = Model(*PRESETS["llama-tiny"])
    terms = {flag: dict((t[0], t[1]) for t in Plan(model, gpus=4, fpdt=2, device="cpu",
                                                   distributed_optimizer=flag).static_terms())
             for flag in (False, True)}
    assert terms[True]["Adam moments (fp32)"] * 4 == pytest.approx(terms[False]["Adam moments (fp32)"])
    assert terms[True]["parameters (fp32)"] == terms[False]["parameters (fp32)"]


def test_fsdp2_shards_the_model_state_as_measured_and_the_papers_8b_run_fits_80_gb():
    """--use-torch-fsdp2: parameters, gradients and Adam state 1/N each on every rank; the CPU plan
    of llama-tiny equals what bench/sharding_memory.py measured (docs/BENCHMARKS.md: 36.8, 36.8
    and 73.6 MiB per rank over 2 ranks, fp32); Llama-3-8B at 2M tokens on 4 x 80 GB fits (the
    model state alone did not, unsharded)."""
    tiny = Plan(Model(*PRESETS["llama-tiny"]), gpus=2, fpdt=2, device="cpu", fsdp=True)
    terms = dict((t[0], t[1]) for t in tiny.static_terms())
    mib = 2**20
    assert terms["fp32 parameter shards (master weights)"] / mib == pytest.approx(36.8, abs=0.05)
    assert terms["fp32 gradient shards"] / mib == pytest.approx(36.8, abs=0.05)
    assert terms["Adam moments (fp32 shards)"] / mib == pytest.approx(73.6, abs=0.05)
    plan = dict(model=Model(*PRESETS["llama3-8b"]), gpus=4, fpdt=4, chunk_size=65536)
    fsdp, unsharded = Plan(**plan, fsdp=True), Plan(**plan)
    assert fsdp.fits(2097152, 80 * GiB, 1000 * GiB / 4)
    assert not unsharded.fits(2097152, 80 * GiB, 1000 * GiB / 4)
    sharded_state, state = (sum(t[1] for t in p.static_terms()) for p in (fsdp, unsharded))
    assert sharded_state < 0.6 * state


def test_megatron_fsdp_strategies_shard_what_they_name_and_the_papers_8b_run_fits_with_two_of_them():
    """--use-megatron-fsdp: optim shards the master weights and Adam's moments, optim_grads the
    float32 gradients too, optim_grads_params the bf16 weights too (each 1/N); at 8B on 4 x 80 GB at
    2M tokens the whole float32 gradient buffer of optim does not fit, the other two do. On the
    CPU the strategies are planned as the implementations that run them there."""
    model, seq, host = Model(*PRESETS["llama3-8b"]), 2097152, 1000 * GiB / 4
    plans = {s: Plan(model, gpus=4, fpdt=4, chunk_size=65536, megatron_fsdp=s)
             for s in ("optim", "optim_grads", "optim_grads_params")}
    n = plans["optim"].params_per_rank()
    terms = {s: dict((t[0], t[1]) for t in p.static_terms()) for s, p in plans.items()}
    assert terms["optim"]["gradient buffer (fp32)"] == 4 * n and terms["optim"]["bf16 model weights"] == 2 * n
    assert terms["optim_grads"]["fp32 gradient shards"] == pytest.approx(n)
    assert terms["optim_grads_params"]["bf16 model weights (shards)"] == pytest.approx(2 * n / 4)
    for strategy in plans:
        assert terms[strategy]["fp32 master weights + Adam moments (shards)"] == pytest.approx(3 * n)
    assert [p.fits(seq, 80 * GiB, host) for p in plans.values()] == [False, True, True]
    assert plans["optim_grads_params"].totals(seq)[0] < plans["optim_grads"].totals(seq)[0]
    cpu = dict(model=Model(*PRESETS["llama-tiny"]), gpus=2, fpdt=2, device="cpu")
    assert Plan(**cpu, megatron_fsdp="optim_grads_params").static_terms() == Plan(**cpu, fsdp=True).static_terms()
    assert Plan(**cpu, megatron_fsdp="optim").static_terms() == Plan(**cpu).static_terms()


def test_pipeline_stages_split_the_model_state_and_the_first_stage_holds_the_micro_batches_in_flight():
    """Each stage holds its layers and one vocabulary matrix; the first stage holds its layers'
    checkpointed inputs for min(PP, M) micro batches under 1F1B (so at M >= PP as many as without a
    pipeline), the last for one; interleaved, megatron-core's warm-up. (The held inputs are checked
    against a run in tests/distributed/test_pipeline.py.)"""
    model = Model(*PRESETS["llama3-8b"])
    one, two = Plan(model, gpus=4, fpdt=4), Plan(model, gpus=8, fpdt=4, pp=2)
    per_layer = (one.model_params() - one.root_params()) / 32
    assert two.params_per_rank() == pytest.approx(16 * per_layer + 128256 * 4096 + 4096)
    assert two.dp == 1 and Plan(model, gpus=16, fpdt=4, pp=2).dp == 2
    assert Plan(model, gpus=8, pp=8, microbatches=16).held_layer_inputs("first") == 32
    assert Plan(model, gpus=8, pp=8, microbatches=2).held_layer_inputs("first") == 8
    assert Plan(model, gpus=8, pp=8).held_layer_inputs("last") == 4
    assert Plan(model, gpus=4, pp=4, vp=2, microbatches=8).held_layer_inputs("first") == (3 * 2 + 4 + 1) * 4
    phases = two.phase_terms(2097152)
    assert set(phases) == {"loss backward, last stage", "layer backward, first stage"}
    # FSDP2 with stages: each stage's state sharded over its data x FPDT ranks, its root one matrix
    sharded = dict((t[0], t[1]) for t in Plan(model, gpus=8, fpdt=4, pp=2, fsdp=True).static_terms())
    assert sharded["fp32 parameter shards (master weights)"] == pytest.approx(4 * two.params_per_rank() / 4)
    assert sharded["FSDP root unit gathered (embeddings, output)"] == pytest.approx(2 * (128256 * 4096 + 4096))


def test_the_papers_70b_run_at_4m_fits_32_gpus_of_80_gb_with_fpdt_32_and_fsdp2_not_with_stages():
    """examples/llama3_70b_fpdt_4m_32gpu.sbatch's layout, and why the pipelined ones do not fit:
    without FSDP2 the device binds; with it, PP 2 x FPDT 16 fits the device but twice the tokens per
    rank need twice the host memory for the checkpointed inputs (338 GiB per GPU; 2 TB nodes give 250)."""
    model, seq, host = Model(*PRESETS["llama3-70b"]), 4194304, 2000 * GiB / 8
    fitting = Plan(model, gpus=32, fpdt=32, chunk_size=262144, fsdp=True)
    assert fitting.fits(seq, 80 * GiB, host)
    assert 55 * GiB < fitting.totals(seq)[0] < 70 * GiB
    for layout in (dict(tp=8, fpdt=4), dict(tp=4, fpdt=4, pp=2), dict(tp=8, fpdt=2, pp=2), dict(fpdt=8, pp=4)):
        assert not Plan(model, gpus=32, **layout).fits(seq, 80 * GiB, host), layout
    staged = Plan(model, gpus=32, fpdt=16, pp=2, chunk_size=262144, fsdp=True)
    device, host_bytes = staged.totals(seq)[:2]
    assert device < 80 * GiB and host_bytes > host and not staged.fits(seq, 80 * GiB, host)
    assert not Plan(model, gpus=32, fpdt=8, pp=4, chunk_size=262144, fsdp=True).fits(seq, 80 * GiB, host)
    # Megatron-FSDP shards as FSDP2 does here (its bf16 weights apart from the fp32 masters: a little more),
    # with or without TP: TP 2 x FPDT 16 fits the device, but twice the tokens per rank bind the host again
    mfsdp = Plan(model, gpus=32, fpdt=32, chunk_size=262144, megatron_fsdp="optim_grads_params")
    assert mfsdp.fits(seq, 80 * GiB, host) and fitting.totals(seq)[0] < mfsdp.totals(seq)[0] < 70 * GiB
    tp2 = Plan(model, gpus=32, tp=2, fpdt=16, chunk_size=262144, megatron_fsdp="optim_grads_params")
    device, host_bytes = tp2.totals(seq)[:2]
    assert device < 80 * GiB and host_bytes > host


def test_megatron_fsdp_with_tp_shards_each_tp_ranks_slice_over_data_x_fpdt(capsys):
    """TP 2 x FPDT 2: the strategies' terms are those of the TP-local model (half of it, but for
    the norms) over the 2 FPDT ranks; with pipeline stages the CLI refuses, naming the cause."""
    from tools.memory_planner import main

    model = Model(*PRESETS["llama3-8b"])
    tp2 = Plan(model, gpus=4, tp=2, fpdt=2, chunk_size=65536, megatron_fsdp="optim_grads_params")
    tp1 = Plan(model, gpus=2, fpdt=2, chunk_size=65536, megatron_fsdp="optim_grads_params")
    assert tp2.params_per_rank() == pytest.approx(tp1.params_per_rank() / 2, rel=1e-3)
    terms = dict((t[0], t[1]) for t in tp2.static_terms())
    assert terms["bf16 model weights (shards)"] == pytest.approx(2 * tp2.params_per_rank() / 2)
    assert main(["--preset", "llama3-8b", "--gpus", "4", "--tp", "2", "--fpdt", "2", "--use-megatron-fsdp",
                 "--data-parallel-sharding-strategy", "optim_grads_params"]) == 0
    assert "TP 2 x FPDT 2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--preset", "llama3-8b", "--gpus", "4", "--pp", "2", "--fpdt", "2", "--use-megatron-fsdp",
              "--data-parallel-sharding-strategy", "optim_grads_params"])
    assert "Megatron-FSDP has no pipeline axis" in capsys.readouterr().err


def test_cli_explains_the_dominant_term():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "memory_planner.py"), "--preset", "llama3-8b",
                          "--gpus", "4", "--fpdt", "4", "--seq-length", "2097152", "--chunk-size", "65536",
                          "--gpu-mem-gib", "141"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "dominant device term:" in out.stdout and "longest trainable sequence:" in out.stdout
    assert "recommended chunk size" in out.stdout


@pytest.mark.slow
def test_predictions_within_15_percent_of_measured_cpu_runs():
    """A shape the planner was not calibrated on (llama-wide), FPDT and baseline, two lengths each;
    FPDT's span both peaks of a step (loss backward at 4K, layer backward at 20K)."""
    from bench.train_step import measure

    model = Model(2, 384, 1024, 6, 2, 32000, True, False)
    for kind in ("baseline", "fpdt"):
        plan = Plan(model, 2, tp=1 if kind == "fpdt" else 2, fpdt=2 if kind == "fpdt" else 1, chunk_size=1024,
                    offload=False, offload_checkpoints=False, baseline=kind == "baseline", device="cpu")
        lengths = (4096, 20480) if kind == "fpdt" else (2048, 4096)
        phases = {plan.peak_phase(seq) for seq in lengths}
        assert len(phases) == 2 or kind == "baseline", phases
        for seq in lengths:
            measured = measure(kind, "llama-wide", seq, 2, 1024)["peak_bytes"]
            predicted = sum(plan.totals(seq)[:2])
            assert abs(predicted / measured - 1) < 0.15, (kind, seq, predicted, measured)


def test_loss_rows_are_one_chunk_of_at_most_2_22_logits_and_at_least_128_tokens():
    assert Plan(Model(*PRESETS["llama3-8b"]), gpus=8, tp=2).loss_rows() == 128  # 2^22 / 64128 = 65 < 128
    assert Plan(Model(*PRESETS["llama-tiny"]), gpus=2).loss_rows() == (1 << 22) // 32000


@pytest.mark.parametrize("argv,message", [
    (["--gpus", "0"], "argument --gpus: must be positive, got 0"),
    (["--gpus", "4", "--seq-length", "-4096"], "argument --seq-length: must be positive, got -4096"),
    (["--gpus", "4", "--chunk-size", "0"], "argument --chunk-size: must be positive, got 0"),
    (["--gpus", "4", "--gpu-mem-gib", "-80"], "argument --gpu-mem-gib: must be positive, got -80"),
    (["--gpus", "4", "--tp", "0"], "argument --tp: must be positive, got 0"),
    (["--gpus", "3", "--fpdt", "2"], "--gpus 3 is not divisible by --tp x --fpdt x --pp = 2"),
    (["--gpus", "3", "--fpdt", "3"], "--heads 32 is not divisible by --tp x --fpdt = 3"),
    (["--gpus", "16", "--tp", "16"], "--kv-heads 8 is not divisible by --tp 16"),
    (["--gpus", "4", "--fpdt", "4", "--chunk-size", "1026"], "--chunk-size 1026 is not divisible by --fpdt 4"),
    (["--gpus", "4", "--fpdt", "4", "--chunk-size", "1024", "--seq-length", "3000"],
     "--seq-length 3000 is not divisible by --chunk-size 1024"),
], ids=["zero-gpus", "negative-seq", "zero-chunk", "negative-memory", "zero-tp", "gpus-layout", "heads-layout",
        "kv-heads-tp", "chunk-fpdt", "seq-chunk"])
@pytest.mark.fault
def test_cli_refuses_non_positive_sizes_and_non_dividing_layouts(argv, message, capsys):
    """A user error is argparse's: exit code 2, the message on stderr's last line, no plan printed."""
    from tools.memory_planner import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "llama3-8b", *argv])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2
    assert message in err.strip().splitlines()[-1], err
    assert out == ""


@pytest.mark.fault
def test_cli_refuses_a_hidden_size_the_heads_do_not_divide(capsys):
    from tools.memory_planner import main

    with pytest.raises(SystemExit, match="2"):
        main(["--layers", "2", "--hidden", "100", "--ffn", "256", "--heads", "3", "--vocab", "1000", "--gpus", "1"])
    assert "--hidden 100 is not divisible by --heads 3" in capsys.readouterr().err


@pytest.mark.fault
def test_cli_plans_the_shortest_sequence_when_nothing_fits(capsys):
    """70B on one 80 GiB GPU: the model state alone does not fit; the plan is shown at one chunk, not at 0 tokens."""
    from tools.memory_planner import main

    assert main(["--preset", "llama3-70b", "--gpus", "1", "--chunk-size", "4096"]) == 0
    out = capsys.readouterr().out
    assert "at 4096 tokens, per GPU" in out and "longest trainable sequence: 0 tokens  (4096 tokens do NOT fit)" in out
