#!/usr/bin/env python
"""Long-context retrieval: a pass key hidden at chosen depths of long filler text (needle in a haystack).

    torchrun --nproc-per-node 4 tools/eval_passkey.py --load runs/llama3_8b_stage2 \\
        --lengths 65536 262144 1048576 --depths 0 0.25 0.5 0.75 1 --samples 4 \\
        --fpdt-parallel-size 4 --fpdt-chunk-size 65536 --fpdt-offload \\
        --output passkey.jsonl --plot passkey.svg

Each sample is one sequence of about ``length`` tokens (the run's tokenizer, or the tokenizer flags):

    <intro> <filler> ... The pass key is 48213. Remember it. 48213 is the pass key. ... <filler>
    What is the pass key? The pass key is 48213

with the key sentence after ``depth`` of the filler (0: first, 1: last) and a random key of
``--key-digits`` digits per sample (``--seed``). It is scored teacher-forced in one forward pass: the
sample is retrieved when, at every token of the answer, the model's most likely next token is the
answer's (exactly when greedy decoding would write the key). Only FPDT's forward is needed, so a
sequence far longer than one device's memory is split over the FPDT ranks and chunked as in
training (``--fpdt-parallel-size`` x ``--tensor-model-parallel-size`` processes; with FPDT size 1 by
default). Logits are computed only at the answer's positions, never for the whole sequence.

Output: one JSON line per sample ``{"length", "depth", "sample", "key", "tokens", "retrieved",
"token_accuracy", "key_logprob"}``, then a summary line with the accuracy per (length, depth); the
same table printed (Markdown), and with ``--plot`` a heatmap of accuracy by length and depth
(``.svg`` always; ``.png`` when matplotlib is installed).

Mistakes in the flags (as tools/eval_ppl.py's, plus a length too short to hold the prompt, a depth
outside [0, 1], a checkpoint without a text tokenizer) are one line on stderr, exit code 2, before
the model is built.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
from typing import List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tools.eval_common import (Parser, UsageError, add_model_flags, build_eval_model, check_model_flags,  # noqa: E402
                               check_output, finish, local_batch, open_checkpoint, run_tool, sequence_multiple,
                               text_tokenizer)
from tools.progress import Progress, add_progress_flag  # noqa: E402

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it; you will be asked about it.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def _parse(argv):
    p = Parser(prog="eval_passkey.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--lengths", type=int, nargs="+", required=True, help="sequence lengths in tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="where the key goes, as a fraction of the filler (0: first, 1: last)")
    p.add_argument("--samples", type=int, default=4, help="samples (keys) per length and depth")
    p.add_argument("--key-digits", type=int, default=5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", required=True, help="where the JSON lines go")
    p.add_argument("--plot", default=None, help="heatmap of accuracy by length and depth (.svg, or .png with "
                                                "matplotlib)")
    add_progress_flag(p)
    opts = p.parse_args(argv)
    opts.fpdt = True  # the FPDT model scores every sample, at FPDT size 1 by default
    return opts


def _check_flags(opts):
    for name in ("samples", "key_digits"):
        if getattr(opts, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(opts, name)} must be positive")
    bad = [d for d in opts.depths if not 0 <= d <= 1]
    if bad:
        raise UsageError(f"--depths {bad[0]:g} is outside [0, 1] (0: the key first, 1: last)")
    check_model_flags(opts, "eval_passkey.py")
    multiple = sequence_multiple(opts)
    for length in opts.lengths:
        if length < 1 or length % multiple:
            raise UsageError(f"--lengths {length} is not a positive multiple of {multiple} (the FPDT chunk size, or "
                             f"the FPDT size, that every sequence is split by)")
    check_output("--output", opts.output)
    if opts.plot:
        check_output("--plot", opts.plot)
        if opts.plot.endswith(".png"):
            if importlib.util.find_spec("matplotlib") is None:
                raise UsageError("--plot .png needs matplotlib (pip install matplotlib); or write .svg")
        elif not opts.plot.endswith(".svg"):
            raise UsageError(f"--plot {opts.plot}: name a .svg or .png file")


# -- the samples --------------------------------------------------------------------------


def build_sample(tokenizer, length: int, depth: float, key: str) -> Tuple[List[int], int]:
    """(token ids of at most ``length`` + 1 tokens: the sequence and its last label, the number of
    answer tokens at its end). The filler is repeated as often as fits; the answer's tokens are those
    the whole text has beyond its prompt, so they are tokenized in context (and a tokenizer that
    puts BOS first, as Llama2Tokenizer, puts it first here too)."""
    def text(n: int) -> Tuple[str, str]:
        before = round(depth * n)
        prompt = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (n - before) + QUESTION
        return prompt, prompt + " " + key

    per_filler = max(1, len(tokenizer.tokenize(FILLER * 8)) // 8)
    n = max(0, (length + 1 - len(tokenizer.tokenize(text(0)[1]))) // per_filler)
    while True:
        prompt, whole = text(n)
        ids = tokenizer.tokenize(whole)
        if len(ids) <= length + 1 or n == 0:
            break
        n -= max(1, (len(ids) - length - 1) // per_filler)
        n = max(n, 0)
    if len(ids) > length + 1:
        raise UsageError(f"--lengths {length} is too short for the prompt alone ({len(ids)} tokens)")
    prompt_ids = tokenizer.tokenize(prompt)
    common = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
    return ids, len(ids) - common


def score(model, groups, opts, ids: List[int], answer: int, vocab: int):
    """Teacher-forced on this layout: (tokens of the answer the model ranks first, sum of their log-probs)."""
    n = len(ids) - 1
    length = -(-n // sequence_multiple(opts)) * sequence_multiple(opts)
    batch = local_batch(opts, groups, ids[:-1], ids[1:], length)
    device = next(model.parameters()).device
    wanted = torch.arange(n - answer, n)  # input positions whose next token is the answer's
    positions = batch["position_ids"][0]
    local = torch.nonzero(torch.isin(positions, wanted)).flatten()
    with torch.no_grad():
        hidden = model.final_hidden(batch["tokens"].to(device), batch["position_ids"].to(device))  # [s/P, 1, h]
        rows = hidden[local.to(device)]
        logits, _ = model.output_layer(rows, weight=model.output_weight())  # [k, 1, V/tp]
        if dist.get_world_size(groups.tp) > 1:
            pieces = [torch.empty_like(logits) for _ in range(dist.get_world_size(groups.tp))]
            dist.all_gather(pieces, logits.contiguous(), group=groups.tp)
            logits = torch.cat(pieces, dim=-1)
        logits = logits[:, 0, :vocab].double()
        labels = batch["labels"][0][local].to(device)
        found = torch.zeros(answer, 2, dtype=torch.float64, device=device)
        at = positions[local].to(device) - (n - answer)
        found[at, 0] = (logits.argmax(-1) == labels).double()
        found[at, 1] = torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0]
        if dist.get_world_size(groups.sp) > 1:  # each position is on one FPDT rank
            dist.all_reduce(found, group=groups.sp)
    return int(found[:, 0].sum().item()), float(found[:, 1].sum().item())


# -- the report ---------------------------------------------------------------------------


def table(cells, lengths, depths) -> str:
    """Markdown: accuracy per length (rows) and depth (columns)."""
    head = "| length | " + " | ".join(f"depth {d:g}" for d in depths) + " | all |"
    lines = [head, "|" + "---|" * (len(depths) + 2)]
    for length in lengths:
        row = [cells[(length, d)] for d in depths]
        total = sum(c[0] for c in row) / max(1, sum(c[1] for c in row))
        lines.append(f"| {length} | " + " | ".join(f"{c[0] / c[1]:.2f}" for c in row) + f" | {total:.2f} |")
    return "\n".join(lines)


def svg_heatmap(cells, lengths, depths, title: str) -> str:
    """Accuracy by length (x) and depth (y), red (0) to green (1), each cell labelled."""
    cw, ch, left, top = 90, 36, 80, 40
    width, height = left + cw * len(lengths) + 20, top + ch * len(depths) + 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12">', f'<text x="{left}" y="20" font-size="14">{title}</text>']
    for i, length in enumerate(lengths):
        out.append(f'<text x="{left + cw * i + cw / 2}" y="{top + ch * len(depths) + 18}" '
                   f'text-anchor="middle">{length}</text>')
        for j, depth in enumerate(depths):
            hit, n = cells[(length, depth)]
            acc = hit / n
            color = f"rgb({int(220 * (1 - acc)) + 20},{int(180 * acc) + 40},60)"
            x, y = left + cw * i, top + ch * j
            out.append(f'<rect x="{x}" y="{y}" width="{cw - 2}" height="{ch - 2}" fill="{color}"/>')
            out.append(f'<text x="{x + cw / 2}" y="{y + ch / 2 + 4}" text-anchor="middle" fill="white">'
                       f'{acc:.2f}</text>')
    for j, depth in enumerate(depths):
        out.append(f'<text x="{left - 8}" y="{top + ch * j + ch / 2 + 4}" text-anchor="end">{depth:g}</text>')
    out.append(f'<text x="{left + cw * len(lengths) / 2}" y="{height - 8}" text-anchor="middle">sequence length '
               f'(tokens)</text>')
    out.append(f'<text x="14" y="{top + ch * len(depths) / 2}" transform="rotate(-90 14 '
               f'{top + ch * len(depths) / 2})" text-anchor="middle">depth</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def _png_heatmap(cells, lengths, depths, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [[cells[(length, d)][0] / cells[(length, d)][1] for length in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.5 * len(depths) + 1.5))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("depth")
    ax.set_title(title)
    for j, row in enumerate(grid):
        for i, acc in enumerate(row):
            ax.text(i, j, f"{acc:.2f}", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    opts = _parse(argv)

    def work():
        _check_flags(opts)
        return _evaluate(opts)
    return run_tool("eval_passkey.py", work)


def _evaluate(opts) -> int:
    from megatron.training.notices import quiet_known_notices

    quiet_known_notices()
    ckpt = open_checkpoint(opts)
    tokenizer = text_tokenizer(opts, ckpt)
    if tokenizer is None or type(tokenizer).__name__ == "NullTokenizer":
        raise UsageError(f"--load {opts.load}: the checkpoint names no text tokenizer; pass --tokenizer-type and "
                         f"its files (the model's own)")
    rng = random.Random(opts.seed)
    samples = []  # (length, depth, sample, key, ids, answer tokens): built before the model, so errors come first
    for length in opts.lengths:
        for depth in opts.depths:
            for index in range(opts.samples):
                key = str(rng.randrange(10 ** (opts.key_digits - 1), 10 ** opts.key_digits))
                ids, answer = build_sample(tokenizer, length, depth, key)
                samples.append((length, depth, index, key, ids, answer))
    bad = next((t for *_, ids, _ in samples for t in ids if not 0 <= t < ckpt.vocab), None)
    if bad is not None:
        raise UsageError(f"the tokenizer gives id {bad}, outside the model's vocabulary [0, {ckpt.vocab}): pass the "
                         f"model's own tokenizer")
    model, groups = build_eval_model(opts, ckpt, max(opts.lengths))
    first = dist.get_rank() == 0
    cells = {(length, depth): [0, 0] for length in opts.lengths for depth in opts.depths}
    bar = Progress(len(samples), "eval_passkey", unit="sample", enabled=not opts.no_progress, rank=dist.get_rank())
    with open(opts.output, "w") if first else open(os.devnull, "w") as out, bar:
        for length, depth, index, key, ids, answer in samples:
            hits, logprob = score(model, groups, opts, ids, answer, ckpt.vocab)
            cells[(length, depth)][0] += hits == answer
            cells[(length, depth)][1] += 1
            out.write(json.dumps({"length": length, "depth": depth, "sample": index, "key": key,
                                  "tokens": len(ids) - 1, "retrieved": hits == answer,
                                  "token_accuracy": hits / answer, "key_logprob": logprob}) + "\n")
            bar.update(length=length, depth=f"{depth:g}", retrieved=sum(c[0] for c in cells.values()))
        summary = {"summary": True, "samples": len(samples),
                   "accuracy": sum(c[0] for c in cells.values()) / len(samples),
                   "cells": [{"length": n, "depth": d, "retrieved": c[0], "samples": c[1], "accuracy": c[0] / c[1]}
                             for (n, d), c in cells.items()]}
        out.write(json.dumps(summary) + "\n")
    if first:
        print(table(cells, opts.lengths, opts.depths))
        print(f"pass-key retrieval: {summary['accuracy']:.3f} of {len(samples)} samples")
        if opts.plot:
            title = f"pass-key retrieval, {os.path.basename(os.path.normpath(opts.load))}"
            if opts.plot.endswith(".png"):
                _png_heatmap(cells, opts.lengths, opts.depths, title, opts.plot)
            else:
                with open(opts.plot, "w") as f:
                    f.write(svg_heatmap(cells, opts.lengths, opts.depths, title))
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
