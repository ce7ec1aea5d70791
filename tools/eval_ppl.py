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

Mistakes in the flags and the input (a missing --load directory or no usable checkpoint in
it, a missing or malformed input line, a token id outside the model's vocabulary, an FPDT
chunk size its parallel size does not divide, a process count other than TP x FPDT) are
one line on stderr, printed by rank 0 only, and exit code 2, before the model is built
(and before the checkpoint is read, but for what needs its vocabulary or tokenizer).
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

from megatron.training.tokenizer import TOKENIZER_TYPES, load_tokenizer  # noqa: E402


class UsageError(Exception):
    """A mistake in the flags or the input: one line saying what to change (exit code 2)."""


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # as argparse's, printed once however many processes torchrun starts
        if _rank0():
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _parse(argv):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    return p.parse_args(argv)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _check_flags(opts):
    """Mistakes in the flags and the paths they name, before anything is loaded."""
    for name in ("bucket_size", "fpdt_chunk_size", "tensor_model_parallel_size", "fpdt_parallel_size"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value} must be positive")
    if not opts.fpdt and (opts.fpdt_parallel_size != 1 or opts.fpdt_chunk_size or opts.fpdt_offload):
        raise UsageError("--fpdt-parallel-size, --fpdt-chunk-size and --fpdt-offload need --fpdt")
    if opts.fpdt_chunk_size and opts.fpdt_chunk_size % opts.fpdt_parallel_size:
        raise UsageError(f"--fpdt-chunk-size {opts.fpdt_chunk_size} is not a multiple of --fpdt-parallel-size "
                         f"{opts.fpdt_parallel_size} (each chunk is split over the FPDT ranks)")
    ranks = opts.tensor_model_parallel_size * opts.fpdt_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != ranks:
        raise UsageError(f"eval_ppl runs one document at a time on TP x FPDT = {ranks} processes; launch {ranks}, "
                         f"not {world}")
    if not os.path.isdir(opts.load):
        raise UsageError(f"--load {opts.load} " + ("is a file; give the checkpoint directory"
                                                   if os.path.exists(opts.load) else "does not exist"))
    if not os.path.isfile(opts.input):
        raise UsageError(f"--input {opts.input} " + ("is a directory, not a file" if os.path.isdir(opts.input)
                                                     else "does not exist"))
    folder = os.path.dirname(os.path.abspath(opts.output))
    if os.path.isdir(opts.output) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UsageError(f"--output {opts.output} cannot be written" + ("" if os.path.isdir(folder) else
                                                                        f" ({folder} does not exist)"))
    for flag in ("tokenizer_model", "vocab_file", "merge_file"):
        path = getattr(opts, flag)
        if path is not None and not os.path.exists(path):
            raise UsageError(f"--{flag.replace('_', '-')} {path} does not exist")


def _read_records(path, key):
    """[(line number, id, token ids or text)] of the input's documents; a UsageError names a bad line."""
    records = []
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UsageError(f"--input {path} cannot be read ({e.strerror})") from None
    for number, raw in enumerate(lines, start=1):
        where = f"--input {path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{where}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise UsageError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "tokens" in record:
            content = record["tokens"]
            if not isinstance(content, list) or not all(type(t) is int for t in content):
                raise UsageError(f"{where}: 'tokens' must be a list of integer ids")
        elif key in record:
            content = record[key]
            if not isinstance(content, str):
                raise UsageError(f"{where}: {key!r} is {type(content).__name__}, not a string")
        else:
            raise UsageError(f"{where}: needs {key!r} or 'tokens' (--json-key names the text's key)")
        records.append((number, record.get("id"), content))
    if not records:
        raise UsageError(f"--input {path} holds no document")
    return records


def _documents(records, path, tokenizer, vocab):
    """[(id, token ids)]: text tokenized, every id checked against the model's vocabulary."""
    docs = []
    for number, doc_id, content in records:
        where = f"--input {path}:{number}"
        ids = content
        if isinstance(content, str):
            if tokenizer is None:
                raise UsageError(f"{where}: text input needs a tokenizer (the checkpoint names none); pass "
                                 f"--tokenizer-type and its files")
            try:
                ids = tokenizer.tokenize(content)
            except ValueError as e:  # NullTokenizer: not space-separated integers; a lone surrogate
                raise UsageError(f"{where}: the {type(tokenizer).__name__} cannot tokenize it ({_first_line(e)})"
                                 ) from None
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise UsageError(f"{where}: token id {bad} is outside the model's vocabulary [0, {vocab}); "
                             f"tokenize with the model's own tokenizer")
        docs.append((doc_id, ids))
    if all(len(ids) < 2 for _, ids in docs):
        raise UsageError(f"--input {path}: no document has the 2 tokens needed to score one")
    return docs


def _bucket(position, size):
    if size:
        return position // size * size, (position // size + 1) * size
    if position == 0:
        return 0, 1
    lo = 1 << (position.bit_length() - 1)
    return lo, lo * 2


def main(argv=None) -> int:
    opts = _parse(argv)
    try:
        _check_flags(opts)
        records = _read_records(opts.input, opts.json_key)
        return _evaluate(opts, records)
    except UsageError as e:
        if _rank0():
            print(f"eval_ppl.py: error: {e}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2


def _evaluate(opts, records) -> int:
    from megatron.training.notices import quiet_known_notices

    quiet_known_notices()
    from megatron.core import dist_checkpointing

    from fpdt_ext.core.config import FPDTConfig
    from fpdt_ext.core.layout import fpdt_shard_batch, fpdt_unshard
    from fpdt_ext.runtime import init_distributed
    from megatron.training.checkpointing import (CheckpointError, model_config_from_args, model_for_checkpoint,
                                                 newest_usable_checkpoint)
    from megatron.training.config import DataConfig, ParallelConfig, RunConfig, TokenizerConfig, TrainingConfig
    from megatron.training.initialize import initialize
    from megatron.training.models import build_model

    init_distributed()
    path, reasons = newest_usable_checkpoint(opts.load)
    if path is None:
        raise UsageError(f"--load {opts.load}: no usable checkpoint (" + ("; ".join(reasons) or "no iter_* "
                         "directory") + "); point --load at a training run's --save directory")
    common = dist_checkpointing.load_common_state_dict(path)
    if "model_args" not in common:
        raise UsageError(f"--load {opts.load}: {path} holds no model arguments (not written by this project's "
                         f"training); convert it with tools/checkpoint/convert.py")
    model_args = common["model_args"]
    vocab = common.get("true_vocab_size") or model_args["vocab_size"]
    names = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")
    text_tokenizer = TokenizerConfig(**{k: getattr(opts, k) or model_args.get(k) for k in names}, vocab_size=vocab)
    tokenizer = None
    if text_tokenizer.tokenizer_type is not None and any(isinstance(c, str) for _, _, c in records):
        try:
            tokenizer = load_tokenizer(text_tokenizer)
        except ValueError as e:
            raise UsageError(str(e)) from None
    docs = _documents(records, opts.input, tokenizer, vocab)
    sp = opts.fpdt_parallel_size if opts.fpdt else 1
    multiple = opts.fpdt_chunk_size or sp
    longest = max(len(ids) - 1 for _, ids in docs)
    padded_longest = -(-longest // multiple) * multiple
    model = model_config_from_args(model_args)
    positions = model.max_position_embeddings
    if model.position_embedding_type == "rope":
        positions = max(padded_longest, positions)
    elif padded_longest > positions:
        raise UsageError(f"a document of {longest + 1} tokens is longer than the model's {positions} learned "
                         f"positions; score shorter documents")
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
        raise UsageError(str(e)) from None
    try:  # the checkpoint's own padded vocabulary: exact at any TP size that divides it
        padded = model_for_checkpoint(common, path, config.model, vocab, opts.tensor_model_parallel_size)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    groups = initialize(config)
    model = build_model(config, groups, vocab, padded_vocab=padded)
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
