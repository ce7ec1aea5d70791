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
default). Works on 1 or more processes (world = TP x FPDT x PP): with
``--pipeline-model-parallel-size`` each document passes through the stages
(megatron-core's forward-only schedule); a checkpoint loads at any pipeline size.

Mistakes in the flags and the input (a missing --load directory or no usable checkpoint in
it, a missing or malformed input line, a token id outside the model's vocabulary, an FPDT
chunk size its parallel size does not divide, a process count other than TP x FPDT x PP, layers
the stages do not split evenly) are
one line on stderr, printed by rank 0 only, and exit code 2, before the model is built
(and before the checkpoint is read, but for what needs its vocabulary or tokenizer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tools.eval_common import (Parser, UsageError, add_model_flags, build_eval_model, check_model_flags,  # noqa: E402
                               check_output, finish, first_line, local_batch, local_chunks, open_checkpoint, run_tool,
                               sequence_multiple, stage_output, text_tokenizer)
from tools.progress import Progress, add_progress_flag  # noqa: E402


def _parse(argv):
    p = Parser(prog="eval_ppl.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, pipeline=True)
    p.add_argument("--input", required=True, help="jsonl with 'text' or 'tokens' per line")
    p.add_argument("--output", required=True, help="where the JSON lines go")
    p.add_argument("--json-key", default="text")
    p.add_argument("--bucket-size", type=int, default=None, help="position bucket width (default: powers of 2)")
    add_progress_flag(p)
    return p.parse_args(argv)


def _check_flags(opts):
    """Mistakes in the flags and the paths they name, before anything is loaded."""
    if opts.bucket_size is not None and opts.bucket_size < 1:
        raise UsageError(f"--bucket-size {opts.bucket_size} must be positive")
    check_model_flags(opts, "eval_ppl.py")
    if not os.path.isfile(opts.input):
        raise UsageError(f"--input {opts.input} " + ("is a directory, not a file" if os.path.isdir(opts.input)
                                                     else "does not exist"))
    check_output("--output", opts.output)


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
                raise UsageError(f"{where}: the {type(tokenizer).__name__} cannot tokenize it ({first_line(e)})"
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

    def work():
        _check_flags(opts)
        return _evaluate(opts, _read_records(opts.input, opts.json_key))
    return run_tool("eval_ppl.py", work)


def _evaluate(opts, records) -> int:
    from megatron.training.notices import quiet_known_notices

    quiet_known_notices()
    from fpdt_ext.core.layout import fpdt_unshard

    ckpt = open_checkpoint(opts)
    tokenizer = text_tokenizer(opts, ckpt) if any(isinstance(c, str) for _, _, c in records) else None
    docs = _documents(records, opts.input, tokenizer, ckpt.vocab)
    multiple = sequence_multiple(opts)
    longest = max(len(ids) - 1 for _, ids in docs)
    model, groups = build_eval_model(opts, ckpt, -(-longest // multiple) * multiple)
    sp = opts.fpdt_parallel_size if opts.fpdt else 1

    first = dist.get_rank() == 0
    out = open(opts.output, "w") if first else None
    buckets, total_nll, total_tokens = {}, 0.0, 0
    with Progress(sum(max(len(ids) - 1, 0) for _, ids in docs), "eval_ppl", unit="token",
                  enabled=not opts.no_progress, rank=dist.get_rank()) as bar:
        for index, (doc_id, ids) in enumerate(docs):
            n = len(ids) - 1
            if n < 1:
                continue
            length = -(-n // multiple) * multiple
            batch = local_batch(opts, groups, ids[:-1], ids[1:], length)
            losses = stage_output(model, groups, opts, batch, length).float().cpu()  # [1, length/P]
            if opts.fpdt and sp > 1:
                pieces = [torch.empty_like(losses) for _ in range(sp)]
                dist.all_gather(pieces, losses, group=groups.sp)
                losses = fpdt_unshard(pieces, dim=1, num_chunks=local_chunks(opts, length))
            nll = losses[0, :n].double()
            if first:
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
                bar.update(n, docs=f"{index + 1}/{len(docs)}")
    if first:
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
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
