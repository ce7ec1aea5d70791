#!/usr/bin/env python
"""Long-context evaluation of a checkpoint: per-document NLL and perplexity by context position.

    torchrun --nproc-per-node 4 tools/eval_ppl.py --load runs/llama3_8b --input books.jsonl \\
        --output ppl.jsonl --fpdt --fpdt-parallel-size 4 --fpdt-chunk-size 65536 --fpdt-offload

Each input line is ``{"text": ...}`` (tokenized with the run's tokenizer, or the
tokenizer flags given here) or ``{"tokens": [...]}``. Every document is scored
whole, forward only, in one sequence: with ``--fpdt`` it is split over the FPDT
group and chunked, so documents far longer than one device's memory fit. A
document is padded to the sequence multiple FPDT needs; padding is never scored.

Output (JSON lines): one line per document ``{"doc", "tokens", "nll", "ppl"}``
(plus ``"id"`` when the input has one), then a summary line with the totals and
the perplexity per context-position bucket (the standard long-context curve:
buckets [0, B), [B, 2B), ... with ``--bucket-size B``, or powers of two by
default). Works on 1 or more processes (world = TP x FPDT).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (newest usable checkpoint is used)")
    p.add_argument("--input", required=True, help="jsonl with 'text' or 'tokens' per line")
    p.add_argument("--output", required=True, help="where the JSON lines go")
    p.add_argument("--json-key", default="text")
    p.add_argument("--bucket-size", type=int, default=None, help="position bucket width (default: powers of 2)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--fpdt", action="store_true")
    p.add_argument("--fpdt-parallel-size", type=int, default=1)
    p.add_argument("--fpdt-chunk-size", type=int, default=None)
    p.add_argument("--fpdt-offload", action="store_true")
    p.add_argument("--tokenizer-type", default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    return p.parse_args(argv)


def _documents(path, key, tokenizer):
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "tokens" in record:
                ids = [int(t) for t in record["tokens"]]
            elif key in record:
                if tokenizer is None:
                    raise SystemExit(f"{path}:{number}: text input needs a tokenizer (the checkpoint names none); "
                                     f"pass --tokenizer-type and its files")
                ids = tokenizer.tokenize(record[key])
            else:
                raise SystemExit(f"{path}:{number}: needs '{key}' or 'tokens'")
            yield record.get("id"), ids


def _bucket(position, size):
    if size:
        return position // size * size, (position // size + 1) * size
    if position == 0:
        return 0, 1
    lo = 1 << (position.bit_length() - 1)
    return lo, lo * 2


def main(argv=None) -> int:
    opts = _parse(argv)
    from megatron.training.notices import quiet_known_notices

    quiet_known_notices()
    from megatron.core import dist_checkpointing

    from fpdt_ext.core.config import FPDTConfig
    from fpdt_ext.core.layout import fpdt_shard_batch, fpdt_unshard
    from fpdt_ext.runtime import init_distributed
    from megatron.training.checkpointing import model_config_from_args, newest_usable_checkpoint
    from megatron.training.config import DataConfig, ParallelConfig, RunConfig, TokenizerConfig, TrainingConfig
    from megatron.training.initialize import initialize
    from megatron.training.models import build_model
    from megatron.training.tokenizer import build_tokenizer

    init_distributed()
    path, reasons = newest_usable_checkpoint(opts.load)
    if path is None:
        raise SystemExit(f"no usable checkpoint in {opts.load}" + "".join(f"\n  {r}" for r in reasons))
    common = dist_checkpointing.load_common_state_dict(path)
    model_args = common["model_args"]
    vocab = common.get("true_vocab_size") or model_args["vocab_size"]
    names = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")
    text_tokenizer = TokenizerConfig(**{k: getattr(opts, k) or model_args.get(k) for k in names}, vocab_size=vocab)
    tokenizer = (build_tokenizer(text_tokenizer) if text_tokenizer.tokenizer_type not in (None, "NullTokenizer")
                 else None)
    docs = list(_documents(opts.input, opts.json_key, tokenizer))
    sp = opts.fpdt_parallel_size if opts.fpdt else 1
    multiple = opts.fpdt_chunk_size or sp
    longest = max(len(ids) - 1 for _, ids in docs)
    padded_longest = -(-longest // multiple) * multiple
    model = model_config_from_args(model_args)
    positions = model.max_position_embeddings
    if model.position_embedding_type == "rope":
        positions = max(padded_longest, positions)
    elif padded_longest > positions:
        raise SystemExit(f"a document of {longest + 1} tokens is longer than the model's {positions} learned positions")
    model = dataclasses.replace(model, attention_dropout=0.0, hidden_dropout=0.0, max_position_embeddings=positions)
    try:
        fpdt = FPDTConfig(fpdt_parallel_size=sp, fpdt_chunk_size=opts.fpdt_chunk_size,
                          fpdt_offload=opts.fpdt_offload) if opts.fpdt else None
        config = RunConfig(model=model, training=TrainingConfig(seq_length=padded_longest, train_iters=1),
                           data=DataConfig(mock_data=True),
                           parallel=ParallelConfig(world_size=dist.get_world_size(),
                                                   tensor_model_parallel_size=opts.tensor_model_parallel_size,
                                                   fpdt_parallel_size=sp),
                           tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=vocab), fpdt=fpdt)
    except ValueError as e:
        raise SystemExit(f"eval_ppl.py: {e}")
    if config.parallel.data_parallel_size != 1:
        raise SystemExit(f"eval_ppl runs one document at a time on TP x FPDT ranks; launch "
                         f"{dist.get_world_size() // config.parallel.data_parallel_size} processes")
    groups = initialize(config)
    model = build_model(config, groups, vocab)
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, path)["model"])
    model.eval()

    rank0 = dist.get_rank() == 0
    out = open(opts.output, "w") if rank0 else None
    buckets, total_nll, total_tokens = {}, 0.0, 0
    for index, (doc_id, ids) in enumerate(docs):
        n = len(ids) - 1
        if n < 1:
            continue
        length = -(-n // multiple) * multiple
        pad = length - n
        tokens = torch.tensor(ids[:-1] + [0] * pad).view(1, length)
        batch = {"tokens": tokens, "labels": torch.tensor(ids[1:] + [0] * pad).view(1, length),
                 "position_ids": torch.arange(length).view(1, length)}
        if opts.fpdt:
            u = length // opts.fpdt_chunk_size if opts.fpdt_chunk_size else 1
            batch = fpdt_shard_batch(batch, sp_rank=groups.sp_rank, sp_size=sp, num_chunks=u)
        device = next(model.parameters()).device
        with torch.no_grad():
            losses = model(*(batch[k].to(device) for k in ("tokens", "position_ids")), None,
                           labels=batch["labels"].to(device)).float().cpu()  # [1, length/P]
        if opts.fpdt and sp > 1:
            pieces = [torch.empty_like(losses) for _ in range(sp)]
            dist.all_gather(pieces, losses, group=groups.sp)
            losses = fpdt_unshard(pieces, dim=1, num_chunks=u)
        nll = losses[0, :n].double()
        if rank0:
            for position, value in enumerate(nll.tolist()):
                key = _bucket(position, opts.bucket_size)
                acc = buckets.setdefault(key, [0.0, 0])
                acc[0] += value
                acc[1] += 1
            mean = nll.mean().item()
            total_nll += nll.sum().item()
            total_tokens += n
            row = {"doc": index, "tokens": n, "nll": mean, "ppl": math.exp(min(mean, 50))}
            if doc_id is not None:
                row["id"] = doc_id
            out.write(json.dumps(row) + "\n")
    if rank0:
        summary = {"summary": True, "documents": len(docs), "tokens": total_tokens,
                   "nll": total_nll / max(total_tokens, 1),
                   "ppl": math.exp(min(total_nll / max(total_tokens, 1), 50)),
                   "buckets": [{"start": lo, "end": hi, "tokens": c, "nll": s / c, "ppl": math.exp(min(s / c, 50))}
                               for (lo, hi), (s, c) in sorted(buckets.items())]}
        out.write(json.dumps(summary) + "\n")
        out.close()
        print(f"{summary['documents']} documents, {total_tokens} scored tokens, NLL {summary['nll']:.4f}, "
              f"PPL {summary['ppl']:.3f}")
        for b in summary["buckets"]:
            print(f"  positions [{b['start']:>8}, {b['end']:>8}): {b['tokens']:>9} tokens  PPL {b['ppl']:.3f}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
