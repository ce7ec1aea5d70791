#!/usr/bin/env python
"""Tokenize jsonl into Megatron's ``.bin/.idx`` datasets (megatron-core's IndexedDatasetBuilder).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --append-eod --workers 2

Writes ``{output-prefix}_{key}_document.bin`` and ``.idx`` for each ``--json-keys``
key, as Megatron-LM's tool does. Both files are written under temporary names
and renamed only when complete (``.bin`` first, then ``.idx``), so an
interrupted run leaves nothing that looks like a dataset.

A malformed line (bad JSON, a missing key, a non-string value) is reported
with its line number; by default it is skipped and counted in the summary,
``--on-malformed fail`` stops without writing anything. Documents are written in
input order whatever ``--workers`` is.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megatron.training.tokenizer import add_tokenizer_args, build_tokenizer, check_tokenizer_args  # noqa: E402

_TOKENIZER = None


def _init_worker(args):
    global _TOKENIZER
    _TOKENIZER = build_tokenizer(args)


def _encode(job):
    """(line number, raw line, keys, append_eod) -> (line number, {key: ids} or None, error or None)."""
    number, line, keys, append_eod = job
    if not line.strip():
        return number, None, "empty line"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return number, None, f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(record, dict):
        return number, None, f"expected a JSON object, got {type(record).__name__}"
    out = {}
    for key in keys:
        if key not in record:
            return number, None, f"missing key {key!r}"
        if not isinstance(record[key], str):
            return number, None, f"key {key!r} is {type(record[key]).__name__}, not a string"
        ids = _TOKENIZER.tokenize(record[key])
        if append_eod:
            ids.append(_TOKENIZER.eod)
        out[key] = ids
    return number, out, None


class Progress:
    """A one-line progress bar on stderr with throughput, at most a few updates a second."""

    def __init__(self, total_bytes: int, interval: float = 0.5):
        self.total, self.interval = max(total_bytes, 1), interval
        self.start = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done_bytes, docs, tokens, force=False):
        now = time.perf_counter()
        if not force and now - self.last < (self.interval if self.tty else 10 * self.interval):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        frac = min(done_bytes / self.total, 1.0)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        line = (f"[{bar}] {100 * frac:5.1f}% {docs} docs {tokens} tokens | {docs / elapsed:.0f} docs/s "
                f"{done_bytes / elapsed / 2**20:.1f} MB/s {tokens / elapsed:.0f} tokens/s")
        print(("\r" if self.tty else "") + line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self):
        if self.tty:
            print(file=sys.stderr)


def _jobs(path, keys, append_eod, counter):
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            counter[0] += len(raw)
            yield number, raw.decode("utf-8", errors="replace"), keys, append_eod


def preprocess(args) -> dict:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tokenizer = build_tokenizer(args)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    final = {k: f"{args.output_prefix}_{k}_document" for k in args.json_keys}
    # Temporary names that do not end in .bin/.idx, so nothing half-written looks like a dataset.
    tmp = {(k, ext): f"{p}.{ext}.tmp-{os.getpid()}" for k, p in final.items() for ext in ("bin", "idx")}
    builders = {k: IndexedDatasetBuilder(tmp[k, "bin"], dtype=dtype) for k in args.json_keys}
    stats = dict(documents=0, tokens=0, skipped=0, malformed=[])
    read = [0]
    progress = Progress(os.path.getsize(args.input))
    pool = mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(args,)) \
        if args.workers > 1 else None
    _init_worker(args)
    jobs = _jobs(args.input, args.json_keys, args.append_eod, read)
    results = pool.imap(_encode, jobs, chunksize=16) if pool else map(_encode, jobs)
    ok = False
    try:
        for number, encoded, error in results:
            if error is not None:
                stats["skipped"] += 1
                stats["malformed"].append((number, error))
                print(f"\n{args.input}:{number}: {error}" + ("" if args.on_malformed == "skip" else " (stopping)"),
                      file=sys.stderr)
                if args.on_malformed == "fail":
                    raise SystemExit(1)
                continue
            for key, ids in encoded.items():
                builders[key].add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            stats["documents"] += 1
            stats["tokens"] += sum(len(ids) for ids in encoded.values())
            progress.update(read[0], stats["documents"], stats["tokens"])
        for key, builder in builders.items():
            builder.finalize(tmp[key, "idx"])
        for key in args.json_keys:  # publish: data first, index last
            os.replace(tmp[key, "bin"], final[key] + ".bin")
            os.replace(tmp[key, "idx"], final[key] + ".idx")
        ok = True
    finally:
        if pool:
            pool.terminate()
        progress.update(read[0], stats["documents"], stats["tokens"], force=True)
        progress.close()
        if not ok:
            for builder in builders.values():
                builder.data_file.close()
            for path in tmp.values():
                if os.path.exists(path):
                    os.remove(path)
    stats["elapsed_s"] = time.perf_counter() - progress.start
    stats["outputs"] = [final[k] for k in args.json_keys]
    return stats


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("input and output")
    g.add_argument("--input", required=True, help="a jsonl file, one document per line")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize (default: text)")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--append-eod", action="store_true", help="end every document with the tokenizer's EOD")
    g.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    g.add_argument("--on-malformed", choices=["skip", "fail"], default="skip",
                   help="a malformed line: report and skip it (default), or report and stop")
    p_tok = add_tokenizer_args(parser)
    p_tok.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer only")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tokenizer_type is None:
        parser.error("--tokenizer-type is required")
    problem = check_tokenizer_args(args)
    if problem:
        parser.error(problem)
    if not os.path.isfile(args.input):
        parser.error(f"--input {args.input} does not exist")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    stats = preprocess(args)
    print(f"done: {stats['documents']} documents, {stats['tokens']} tokens, {stats['skipped']} lines skipped "
          f"in {stats['elapsed_s']:.1f}s -> {', '.join(p + '.{bin,idx}' for p in stats['outputs'])}")
    if stats["malformed"]:
        shown = ", ".join(f"{n} ({e})" for n, e in stats["malformed"][:10])
        more = f" and {len(stats['malformed']) - 10} more" if len(stats["malformed"]) > 10 else ""
        print(f"skipped lines: {shown}{more}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
