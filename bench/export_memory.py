#!/usr/bin/env python
"""Peak host memory of the Hugging Face export: streamed shards against one file, measured.

    python bench/export_memory.py [--layers 8 --hidden 1024 --ffn 2816 --vocab 32000] [--out DIR]

Makes a random Llama-shaped Hugging Face model, converts it into one of our checkpoints, then
exports it in fresh processes and reads each one's peak resident memory (``VmHWM``):

* ``floor``: the same process up to the point where export starts reading weights (imports, the
  checkpoint's metadata, the model built on the meta device);
* ``one file``: ``--max-shard-size`` larger than the model (one ``model.safetensors``: the writer
  holds every tensor, as the export before streaming did);
* ``streamed``: ``--max-shard-size`` of about a layer.

Reported: each peak minus the floor, against the model's size in the export dtype (float32), and
the bound the writer promises (one shard plus the largest tensor). The numbers in
docs/STAGES.md ("Export at scale") come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


_REPORT_PEAK = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
finally:
    with open("/proc/self/status") as f:  # VmHWM: this process's own peak (its mm is new since exec)
        print("VmHWM", next(int(line.split()[1]) for line in f if line.startswith("VmHWM")), flush=True)
"""


def _peak_rss_mib(argv) -> float:
    """Run the Python script ``argv`` to completion; its peak resident memory in MiB (Linux VmHWM,
    read in the process itself: ``ru_maxrss`` would count the parent's pages from before exec)."""
    proc = subprocess.run([sys.executable, "-c", _REPORT_PEAK, *argv], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{argv} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return int(proc.stdout.split("VmHWM")[-1].split()[0]) / 1024


def _floor(checkpoint_dir: str):
    """Everything export does before it reads a weight."""
    import torch
    from megatron.core import dist_checkpointing

    from fpdt_ext.runtime import init_distributed
    from megatron.training.checkpointing import model_config_from_args, newest_usable_checkpoint, saved_padded_vocab
    from megatron.training.notices import quiet_known_notices
    from tools.checkpoint.convert import _single_process_model
    from tools.checkpoint.stream import CheckpointTensors

    quiet_known_notices()
    init_distributed()
    path, _ = newest_usable_checkpoint(checkpoint_dir)
    common = dist_checkpointing.load_common_state_dict(path)
    with torch.device("meta"):
        _, meta, _ = _single_process_model(model_config_from_args(common["model_args"]), common["true_vocab_size"],
                                           saved_padded_vocab(common))
    CheckpointTensors(path, meta)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--floor", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.floor:
        _floor(opts.floor)
        return 0
    import torch
    import transformers

    work = opts.out or tempfile.mkdtemp(prefix="export_memory_")
    hf_dir, ckpt = os.path.join(work, "hf"), os.path.join(work, "ckpt")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=opts.vocab, hidden_size=opts.hidden, intermediate_size=opts.ffn,
                                      num_hidden_layers=opts.layers, num_attention_heads=opts.heads,
                                      num_key_value_heads=opts.kv_heads, max_position_embeddings=4096)
    model = transformers.LlamaForCausalLM(config)
    params = sum(t.numel() for t in model.state_dict().values())
    largest = max(t.numel() for t in model.state_dict().values()) * 4
    layer = sum(t.numel() for k, t in model.state_dict().items() if k.startswith("model.layers.0.")) * 4
    model.save_pretrained(hf_dir)
    del model
    convert = [sys.executable, "tools/checkpoint/convert.py", "--model-type", "llama"]
    subprocess.run([*convert, "--loader", "hf", "--saver", "mcore", "--load-dir", hf_dir, "--save-dir", ckpt],
                   cwd=ROOT, check=True, capture_output=True)
    floor = _peak_rss_mib([__file__, "--floor", ckpt])
    export = [*convert[1:], "--loader", "mcore", "--saver", "hf", "--load-dir", ckpt, "--dtype", "float32"]
    model_mib = params * 4 / 2**20
    shard = f"{layer // 10**6 + 1}MB"
    rows = {"one file": _peak_rss_mib([*export, "--save-dir", os.path.join(work, "one"), "--max-shard-size",
                                       f"{params * 8 // 10**6 + 1}MB"]),
            f"streamed, --max-shard-size {shard}": _peak_rss_mib([*export, "--save-dir", os.path.join(work, "streamed"),
                                                                   "--max-shard-size", shard])}
    bound = (int(shard[:-2]) * 10**6 + largest) / 2**20
    result = {"parameters": params, "model_mib_fp32": round(model_mib, 1), "floor_mib": round(floor, 1),
              "layer_mib": round(layer / 2**20, 1), "largest_tensor_mib": round(largest / 2**20, 1),
              "writer_bound_mib": round(bound, 1),
              "exports": {k: {"peak_mib": round(v, 1), "above_floor_mib": round(v - floor, 1),
                              "above_floor_per_model": round((v - floor) / model_mib, 3)} for k, v in rows.items()}}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
