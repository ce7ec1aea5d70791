#!/usr/bin/env python
"""Tokenize jsonl into Megatron's ``.bin/.idx`` datasets (megatron-core's IndexedDatasetBuilder).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --append-eod --workers 2

Writes ``{output-prefix}_{key}_document.bin`` and ``.idx`` for each ``--json-keys``
key, as Megatron-LM's tool does. Documents are written in input order whatever
``--workers`` is.

Nothing half-written looks like a dataset: both files are written under temporary
names (``{output}.bin.tmp-PID-HOST``), synced and renamed only when complete: an existing
``.idx`` of the same name is removed first, then ``.bin`` is renamed, then ``.idx``.
Temporary files of the same outputs left by a killed earlier run on this host are
removed when a new run starts; if their writer is still running (or ran on another
host) the run is refused.

A malformed line (undecodable UTF-8, bad JSON, not an object, a missing key, a
non-string value, text the tokenizer cannot take) is reported with its line number;
by default it is skipped and counted by reason in the summary; ``--on-malformed fail``
stops at the first one, writing nothing. A token id outside ``[0, vocab size)`` is never
written: the run stops naming the line. These and the mistakes in the flags and the
input (a missing or unreadable file, an unloadable tokenizer, an output directory that
cannot be written, no line with the ``--json-keys``, no document at all) are one line on
stderr and exit code 2, before any tokenizing where they can be seen up front.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import multiprocessing as mp
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megatron.training.notices import quiet_known_notices  # noqa: E402
from megatron.training.tokenizer import (add_tokenizer_args, build_tokenizer, check_tokenizer_args,  # noqa: E402
                                         tokenizer_files)
from tools.progress import Progress, add_progress_flag  # noqa: E402

_TOKENIZER = None
_UTF8_BOM = b"\xef\xbb\xbf"
_MAX_REPORTED = 100  # malformed lines printed one by one; the rest are only counted
_TEMP = re.compile(r"\.(?:bin|idx)\.tmp-(\d+)-(.+)")  # what follows "{output}" in a temporary name


class InputError(Exception):
    """A mistake in the flags or the input: one line saying what to change (exit code 2)."""


def _init_worker(args):
    global _TOKENIZER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
    _TOKENIZER = build_tokenizer(args)


def _parse(number, raw):
    """(JSON object, None) or (None, (reason, detail)) for one line's bytes (strict UTF-8)."""
    if number == 1 and raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM):]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, ("invalid UTF-8", f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)")
    if not line.strip():
        return None, ("empty line", "empty line")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, ("invalid JSON", f"invalid JSON ({e.msg} at column {e.colno})")
    if not isinstance(record, dict):
        return None, ("not a JSON object", f"expected a JSON object, got {type(record).__name__}")
    return record, None


def _tokenize(text, key):
    """(ids, None) or (None, (reason, detail)) for text the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON can spell a lone surrogate ("\\ud800"), which is not Unicode text
        return None, ("invalid Unicode", f"key {key!r} holds a lone surrogate ({text[e.start]!r})")
    try:
        return _TOKENIZER.tokenize(text), None
    except ValueError as e:  # NullTokenizer: not space-separated integers
        return None, ("untokenizable", f"cannot tokenize key {key!r}: {e}")


def _encode(job):
    """(line number, raw bytes, keys, append_eod) -> (line number, {key: ids} or None, problem or None).

    A problem is (reason, detail); the reason "vocabulary" (an id outside [0, vocab size)) stops the run."""
    number, raw, keys, append_eod = job
    record, problem = _parse(number, raw)
    if problem:
        return number, None, problem
    out = {}
    for key in keys:
        if key not in record:
            return number, None, ("missing key", f"missing key {key!r}")
        if not isinstance(record[key], str):
            return number, None, ("not a string", f"key {key!r} is {type(record[key]).__name__}, not a string")
        ids, problem = _tokenize(record[key], key)
        if problem:
            return number, None, problem
        if append_eod:
            ids.append(_TOKENIZER.eod)
        ids = np.asarray(ids, dtype=np.int64)
        outside = ids[(ids < 0) | (ids >= _TOKENIZER.vocab_size)]
        if outside.size:
            return number, None, ("vocabulary", f"key {key!r} has token id {int(outside[0])}, outside the "
                                                f"tokenizer's vocabulary [0, {_TOKENIZER.vocab_size})")
        out[key] = ids
    return number, out, None


def _jobs(path, keys, append_eod, counter):
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            counter[0] += len(raw)
            yield number, raw, keys, append_eod


def _outputs(args):
    """{key: output path without extension}."""
    return {k: f"{args.output_prefix}_{k}_document" for k in args.json_keys}


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _leftover_temps(finals):
    """Temporary files of these outputs from earlier runs: (paths whose writer is gone, (path, pid, host)
    of those whose writer may still be running: alive here, or on another host)."""
    stale, live = [], []
    host = socket.gethostname()
    for final in finals:
        folder, base = os.path.split(os.path.abspath(final))
        for name in os.listdir(folder):
            match = _TEMP.fullmatch(name[len(base):]) if name.startswith(base + ".") else None
            if not match:
                continue
            path, pid, writer_host = os.path.join(folder, name), int(match[1]), match[2]
            if writer_host == host and (pid == os.getpid() or not _alive(pid)):  # our pid: an earlier holder's
                stale.append(path)
            else:
                live.append((path, pid, writer_host))
    return stale, live


def _prescan(path, keys, num_lines=100):
    """Refuse an input none of whose first lines is a JSON object with the keys (a wrong --json-keys,
    or a file that is not JSON lines) before any tokenizer starts."""
    seen, first_problem, number = collections.Counter(), None, 0
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(itertools.islice(f, num_lines), start=1):
                record, problem = _parse(number, raw)
                if record is None:
                    if first_problem is None and problem[0] != "empty line":
                        first_problem = f"line {number}: {problem[1]}"
                elif all(k in record for k in keys):
                    return
                else:
                    seen.update(record)
    except OSError as e:
        raise InputError(f"--input {path} cannot be read ({e.strerror})") from None
    if not number:
        raise InputError(f"--input {path} is empty")
    if not seen:
        raise InputError(f"--input {path}: none of its first {number} lines is a JSON object "
                         f"({first_problem or 'all blank'}); it must hold JSON lines, one "
                         f"{{\"{keys[0]}\": \"...\"}} object per line")
    found = ", ".join(repr(k) for k, _ in seen.most_common(10))
    raise InputError(f"--input {path}: none of its first {number} lines has {' and '.join(map(repr, keys))} "
                     f"(keys found: {found}); set --json-keys to the keys to tokenize")


def _check_output(args):
    prefix = args.output_prefix
    folder = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".preprocess-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise InputError(f"--output-prefix {prefix}: cannot write in {folder} ({e.strerror}); choose a writable "
                         f"directory") from None
    _, live = _leftover_temps(_outputs(args).values())
    if live:
        path, pid, host = live[0]
        raise InputError(f"--output-prefix {prefix}: another preprocess_data.py (pid {pid} on {host}) is writing "
                         f"{path}; wait for it or choose another prefix (delete that file if that run is gone)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def check(args):
    """Every mistake that can be seen before tokenizing, as an InputError; returns the tokenizer."""
    if args.tokenizer_type is None:
        raise InputError("--tokenizer-type is required")
    problem = check_tokenizer_args(args)
    if problem:
        raise InputError(problem)
    if args.vocab_size is not None and args.vocab_size < 1:
        raise InputError(f"--vocab-size {args.vocab_size} must be positive")
    if args.workers < 1:
        raise InputError(f"--workers {args.workers} must be at least 1")
    if not os.path.isfile(args.input):
        raise InputError(f"--input {args.input} " + ("is a directory, not a file" if os.path.isdir(args.input)
                                                     else "does not exist"))
    _prescan(args.input, args.json_keys)
    _check_output(args)
    try:
        return build_tokenizer(args)
    except Exception as e:  # each tokenizer library has its own errors for a file it cannot read
        raise InputError(f"cannot load a {args.tokenizer_type} from {', '.join(tokenizer_files(args))} "
                         f"({_first_line(e)}); check --tokenizer-type and the files it is given") from None


def _sync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp_bin, tmp_idx, final):
    """Rename a finished pair into place: the old index goes first and the new index comes last,
    so at no moment does a .bin sit beside an .idx that does not describe it."""
    _sync(tmp_bin)
    _sync(tmp_idx)
    if os.path.exists(final + ".idx"):
        os.remove(final + ".idx")
    os.replace(tmp_bin, final + ".bin")
    os.replace(tmp_idx, final + ".idx")
    _sync(os.path.dirname(os.path.abspath(final)))


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through preprocess(), which removes its temporary files


def preprocess(args, tokenizer) -> dict:
    """Tokenize ``args.input`` into the outputs. Raises InputError for a malformed line under
    ``--on-malformed fail``, an id outside the vocabulary, or no document at all; nothing is
    written then."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    global _TOKENIZER
    _TOKENIZER = tokenizer
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    final = _outputs(args)
    for path in _leftover_temps(final.values())[0]:
        os.remove(path)
        print(f"removed {path}, left by an interrupted run", file=sys.stderr)
    host = socket.gethostname()
    tmp = {(k, ext): f"{p}.{ext}.tmp-{os.getpid()}-{host}" for k, p in final.items() for ext in ("bin", "idx")}
    stats = dict(documents=0, tokens=0, skipped=0, malformed=[], reasons=collections.Counter())
    read = [0]
    start = time.perf_counter()
    progress = Progress(os.path.getsize(args.input), "preprocess", unit="B", enabled=not args.no_progress)
    main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    builders, pool, ok = {}, None, False
    try:
        builders.update({k: IndexedDatasetBuilder(tmp[k, "bin"], dtype=dtype) for k in args.json_keys})
        if args.workers > 1:
            pool = mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(args,))
        jobs = _jobs(args.input, args.json_keys, args.append_eod, read)
        results = pool.imap(_encode, jobs, chunksize=16) if pool else map(_encode, jobs)
        for number, encoded, problem in results:
            if problem is not None:
                _malformed(args, stats, number, problem)
                continue
            for key, ids in encoded.items():
                builders[key].add_document(ids.astype(dtype), [len(ids)])
            stats["documents"] += 1
            stats["tokens"] += sum(len(ids) for ids in encoded.values())
            _show(progress, read[0], stats)
        if not stats["documents"]:
            first = stats["malformed"][0] if stats["malformed"] else None
            raise InputError(f"--input {args.input}: no document to write" +
                             (f": all {stats['skipped']} lines skipped (first: line {first[0]}: {first[1]})"
                              if first else "") + "; nothing written")
        for key, builder in builders.items():
            builder.finalize(tmp[key, "idx"])
        for key in args.json_keys:
            _publish(tmp[key, "bin"], tmp[key, "idx"], final[key])
        ok = True
    finally:
        if pool:
            pool.terminate()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        progress.close(finished=ok)
        if not ok:
            for builder in builders.values():
                builder.data_file.close()
            for path in tmp.values():
                if os.path.exists(path):
                    os.remove(path)
    stats["elapsed_s"] = time.perf_counter() - start
    stats["outputs"] = list(final.values())
    return stats


def _show(progress, read_bytes, stats):
    """Bytes of the input read (rate, time left), documents and tokens written with their rates."""
    if not progress.enabled:
        return
    elapsed = max(time.monotonic() - progress.start, 1e-9)
    progress.update(read_bytes - progress.n, docs=f"{stats['documents']} ({stats['documents'] / elapsed:.0f} docs/s)",
                    tokens=f"{stats['tokens']} ({stats['tokens'] / elapsed:.0f}/s)")


def _malformed(args, stats, number, problem):
    reason, detail = problem
    where = f"{args.input}:{number}: {detail}"
    if reason == "vocabulary":
        hint = ("raise --vocab-size above the largest id" if args.tokenizer_type == "NullTokenizer" else
                "the tokenizer produces ids beyond its own vocabulary size; use a consistent tokenizer")
        raise InputError(f"{where}; {hint}; nothing written")
    if args.on_malformed == "fail":
        raise InputError(f"{where} (--on-malformed fail: nothing written; fix the line or pass --on-malformed "
                         f"skip)")
    stats["skipped"] += 1
    stats["reasons"][reason] += 1
    if len(stats["malformed"]) < 10:
        stats["malformed"].append((number, detail))
    if stats["skipped"] <= _MAX_REPORTED:
        print(f"\n{where} (skipped)", file=sys.stderr)
    elif stats["skipped"] == _MAX_REPORTED + 1:
        print(f"\n{args.input}: more malformed lines; they are counted in the summary", file=sys.stderr)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("input and output")
    g.add_argument("--input", required=True, help="a jsonl file, one document per line, UTF-8")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize (default: text)")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--append-eod", action="store_true", help="end every document with the tokenizer's EOD")
    g.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    g.add_argument("--on-malformed", choices=["skip", "fail"], default="skip",
                   help="a malformed line (invalid UTF-8 or JSON, a missing key, ...): report, skip and count it "
                        "(default), or report it and stop without writing anything")
    p_tok = add_tokenizer_args(parser)
    p_tok.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer only: ids are in [0, this)")
    add_progress_flag(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet_known_notices()
    try:
        stats = preprocess(args, check(args))
    except InputError as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("preprocess_data.py: interrupted; nothing written", file=sys.stderr)
        return 130
    except OSError as e:  # the disk, not the flags: full, removed or read-only since the check
        print(f"preprocess_data.py: error: {e.filename or ''}: {e.strerror or e}; nothing written", file=sys.stderr)
        return 1
    reasons = ", ".join(f"{n} {r}" for r, n in stats["reasons"].most_common())
    print(f"done: {stats['documents']} documents, {stats['tokens']} tokens, {stats['skipped']} lines skipped"
          f"{f' ({reasons})' if reasons else ''} in {stats['elapsed_s']:.1f}s -> "
          f"{', '.join(p + '.{bin,idx}' for p in stats['outputs'])}")
    if stats["malformed"]:
        shown = ", ".join(f"{n} ({e})" for n, e in stats["malformed"])
        more = f" and {stats['skipped'] - len(stats['malformed'])} more" if stats["skipped"] > 10 else ""
        print(f"skipped lines: {shown}{more}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
