"""Streamed, sharded export (tools/checkpoint/stream.py): every tensor read from its stored region
equals what megatron-core's own loader gives for the whole model (checkpoints saved at TP 2 and by
FPDT runs, GPT and Llama), the shards and the index load in transformers with the same weights as a
one-file export, a re-export leaves no stale shard, and the writer holds at most a shard plus one
tensor."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fpdt_ext.testing.spawn import run_world
from tests.helpers import TINY, run_pretrain, run_script

safetensors = pytest.importorskip("safetensors.torch")

NO_GQA = [f for i, f in enumerate(TINY) if f != "--group-query-attention" and "--num-query-groups" not in TINY[i - 1:i + 1]]
RUNS = {  # name -> (script, nproc, flags, model type): checkpoints as training writes them
    "llama_tp2": ("pretrain_llama.py", 2, ["--tensor-model-parallel-size", "2", "--untie-embeddings-and-output-weights"],
                  "llama"),
    "llama_fpdt2": ("pretrain_llama.py", 2, ["--fpdt", "--fpdt-parallel-size", "2", "--fpdt-chunk-size", "32",
                                             "--use-distributed-optimizer"], "llama"),
    "gpt_tp2": ("pretrain_gpt.py", 2, [*NO_GQA, "--tensor-model-parallel-size", "2", "--max-position-embeddings", "128"],
                "gpt2"),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            script, nproc, flags, _ = RUNS[name]
            tmp = tmp_path_factory.mktemp(name)
            run_pretrain(tmp, name, nproc, [*(TINY if script == "pretrain_llama.py" else []), *flags, "--train-iters", "2", "--lr", "1e-2",
                                            "--save", str(tmp / "ckpt")], script=script)
            made[name] = tmp / "ckpt"
        return made[name]
    return get


def _models(checkpoint_dir):
    """(checkpoint path, its common state, the whole model as megatron-core's own loader loads it
    (what export did before it streamed), the same model on the meta device); in a worker process."""
    from megatron.core import dist_checkpointing

    from megatron.training.checkpointing import model_config_from_args, newest_usable_checkpoint, saved_padded_vocab
    from tools.checkpoint.convert import _single_process_model

    path, _ = newest_usable_checkpoint(str(checkpoint_dir))
    common = dist_checkpointing.load_common_state_dict(path)
    a = common["model_args"]
    config, vocab, padded = model_config_from_args(a), common.get("true_vocab_size") or a["vocab_size"], \
        saved_padded_vocab(common)
    _, model, _ = _single_process_model(config, vocab, padded)
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, path)["model"])
    with torch.device("meta"):
        _, meta, _ = _single_process_model(config, vocab, padded)
    return path, common, {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}, meta


def regions_worker(rank, world_size, checkpoint_dir):
    """The names whose streamed read differs from megatron-core's load (and both name lists)."""
    from tools.checkpoint.stream import CheckpointTensors

    path, _, reference, meta = _models(checkpoint_dir)
    stored = CheckpointTensors(path, meta)
    return sorted(stored), sorted(reference), [k for k, t in reference.items() if not torch.equal(stored[k], t)]


def expected_hf_worker(rank, world_size, checkpoint_dir, model_type):
    """The Hugging Face tensors mapped in memory from the whole model as megatron-core loads it."""
    import dataclasses

    from megatron.training.checkpointing import model_config_from_args
    from tools.checkpoint.convert import megatron_to_hf

    _, common, reference, _ = _models(checkpoint_dir)
    return megatron_to_hf(model_type, reference, dataclasses.asdict(model_config_from_args(common["model_args"])),
                          common["true_vocab_size"])


def _export(checkpoint_dir, out, model_type, *extra):
    return run_script(1, "tools/checkpoint/convert.py", ["--model-type", model_type, "--loader", "mcore", "--saver",
                                                          "hf", "--load-dir", str(checkpoint_dir), "--save-dir",
                                                          str(out), *extra]).stdout


def _read_folder(folder):
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    state = {}
    for f in files:
        state.update(safetensors.load_file(os.path.join(folder, f)))
    return files, state


@pytest.mark.parametrize("name", sorted(RUNS))
def test_each_stored_region_reads_as_megatron_core_loads_it(name, trained):
    """CheckpointTensors against dist_checkpointing.load of the whole model, tensor by tensor, for
    checkpoints saved split over TP 2 ranks (qkv, SwiGLU's [gate; up], vocabulary rows) and by FPDT
    runs with the distributed optimizer."""
    stored, reference, differ = run_world(1, regions_worker, str(trained(name)))[0]
    assert stored == reference and len(reference) > 5
    assert differ == []


@pytest.mark.parametrize("name", ["llama_tp2", "gpt_tp2"])
def test_sharded_export_loads_in_transformers_with_the_weights_of_a_one_file_export(name, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    checkpoint, model_type = trained(name), RUNS[name][3]
    out = _export(checkpoint, tmp_path / "sharded", model_type, "--max-shard-size", "60KB", "--dtype", "float32")
    files, sharded = _read_folder(tmp_path / "sharded")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(files) > 3 and f"wrote {len(files)} weight files" in out
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert sorted(index["weight_map"]) == sorted(sharded)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sharded.values())
    for f in files:  # each shard at most 60 KB, unless a single tensor is larger (then it is alone)
        held = safetensors.load_file(str(tmp_path / "sharded" / f))
        assert sum(t.numel() * 4 for t in held.values()) <= 60_000 or len(held) == 1
        assert all(index["weight_map"][k] == f for k in held)

    expected = run_world(1, expected_hf_worker, str(checkpoint), model_type)[0]
    assert sorted(expected) == sorted(sharded)
    for key in expected:
        assert torch.equal(expected[key], sharded[key]), key

    _export(checkpoint, tmp_path / "single", model_type, "--dtype", "float32")
    single_files, single = _read_folder(tmp_path / "single")
    assert single_files == ["model.safetensors"] and not (tmp_path / "single" / "model.safetensors.index.json").exists()
    a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded")).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "single")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_re_export_with_fewer_shards_leaves_no_stale_file(trained, tmp_path):
    checkpoint = trained("llama_tp2")
    _export(checkpoint, tmp_path / "hf", "llama", "--max-shard-size", "40KB")
    many, _ = _read_folder(tmp_path / "hf")
    (tmp_path / "hf" / "README.md").write_text("the user's own file")
    _export(checkpoint, tmp_path / "hf", "llama", "--max-shard-size", "100KB")
    fewer, _ = _read_folder(tmp_path / "hf")
    assert len(fewer) < len(many)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == fewer
    _export(checkpoint, tmp_path / "hf", "llama")  # one file: the index goes too
    assert sorted(os.listdir(tmp_path / "hf")) == ["README.md", "config.json", "model.safetensors"]


def test_the_writer_holds_at_most_one_shard_and_the_tensor_being_added(tmp_path):
    from tools.checkpoint.stream import plan_shards, write_streamed

    torch.manual_seed(0)
    sizes = [37, 5, 300, 12, 12, 80, 1, 64, 64, 2]  # float32 rows of 10: 40 bytes a row
    tensors = [(f"t{i}", torch.randn(n, 10)) for i, n in enumerate(sizes)]
    planned = [(k, t.numel() * 4) for k, t in tensors]
    limit = 4000
    writer = write_streamed(str(tmp_path), iter(tensors), planned, limit)
    assert writer.peak_buffer_bytes <= limit + max(b for _, b in planned)
    shards = plan_shards(planned, limit)
    assert [n for shard in shards for n in shard] == [k for k, _ in tensors]  # order kept, nothing lost
    assert all(sum(dict(planned)[n] for n in shard) <= limit or len(shard) == 1 for shard in shards)
    _, back = _read_folder(tmp_path)
    assert all(torch.equal(back[k], t) for k, t in tensors)


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                           ("1000", 1000), ("1.5 kb", 1500)])
def test_shard_sizes_are_read_as_hugging_face_writes_them(text, expected):
    from tools.checkpoint.stream import parse_size

    assert parse_size(text) == expected


@pytest.mark.fault
def test_a_bad_shard_size_is_one_line_and_exit_2(trained, tmp_path):
    proc = run_script(1, "tools/checkpoint/convert.py", ["--model-type", "llama", "--loader", "mcore", "--saver",
                                                          "hf", "--load-dir", str(trained("llama_tp2")), "--save-dir",
                                                          str(tmp_path / "hf"), "--max-shard-size", "lots"],
                      expect_rc=2)
    assert "--max-shard-size" in proc.stderr and "Traceback" not in proc.stderr
