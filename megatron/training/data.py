"""Batches: megatron-core's GPT datasets, a resumable sampler, and the FPDT layout.

Samples are ``[S]`` sequences from megatron-core's ``GPTDataset`` (or
``MockGPTDataset`` with ``--mock-data``). A global batch of G samples is split
over data-parallel ranks and micro batches in Megatron's order. Every rank of
an FPDT group reads the same samples and keeps its own piece in the FPDT
layout (:func:`fpdt_ext.core.layout.fpdt_shard_batch`): tokens, labels, loss mask
and position ids (the tokens' true global positions) are permuted together.
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, List, Optional, Sequence

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list

from fpdt_ext.core.layout import fpdt_shard_batch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def dataset_config(config, tokenizer) -> GPTDatasetConfig:
    """megatron-core's dataset config for the run ``config`` (:class:`~megatron.training.config.RunConfig`)."""
    data = config.data
    return GPTDatasetConfig(
        random_seed=config.training.seed,
        sequence_length=config.training.seq_length,
        blend=None if data.mock_data else get_blend_from_list(list(data.data_path)),
        split=data.split,
        path_to_cache=data.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=data.reset_position_ids,
        reset_attention_mask=False,
        eod_mask_loss=data.eod_mask_loss,
        create_attention_mask=False,  # FPDT and the baseline attention are causal by construction
    )


def resolve_split(split: str, prefixes, needed) -> str:
    """The split to build with: each split the run reads (``needed``: names among train/validation)
    must give every dataset at least one document, or this raises ValueError saying what to change;
    a split the run does not read that would be empty is dropped (weight 0), because megatron-core
    would otherwise loop forever looking for tokens that are not there."""
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                         parse_and_normalize_split)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    weights = parse_and_normalize_split(split)
    names = ("train", "validation", "test")
    for prefix in prefixes:
        num_docs = len(IndexedDataset(prefix).document_indices) - 1
        for i, bounds in enumerate(convert_split_vector_to_split_matrix(weights)):
            if bounds is None:
                continue
            docs = int(round(bounds[1] * num_docs)) - int(round(bounds[0] * num_docs))
            if docs >= 1:
                continue
            if names[i] in needed:
                raise ValueError(f"{prefix} has {num_docs} documents, which leaves the {names[i]} split empty "
                                 f"under --split {split}; use more documents or a split such as 90,10,0")
            weights[i] = 0.0
    return ",".join(f"{w:.12g}" for w in weights)


def check_dataset_files(prefix: str) -> Optional[str]:
    """What is wrong with the ``prefix`` .bin/.idx pair, or None: the index must be one that
    megatron-core reads (header, version, token type), of exactly the size its counts give, with
    documents that cover its sequences in order, and it must describe the .bin byte for byte
    (a .bin from another dataset, or a truncated one, has another size). Reads only the index."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, _IndexReader

    idx, bin_ = prefix + ".idx", prefix + ".bin"
    remake = "make the pair again with tools/preprocess_data.py"
    try:
        with open(idx, "rb") as f:
            head = f.read(34)
        if head[:9] != _INDEX_HEADER or len(head) < 34:
            return f"--data-path {prefix}: {idx} is not a Megatron dataset index (bad header); {remake}"
        index = _IndexReader(idx, multimodal=False)
    except (AssertionError, ValueError, KeyError) as e:  # bad version or token type, counts beyond the file
        return f"--data-path {prefix}: {idx} is not a readable Megatron dataset index ({e}); {remake}"
    except OSError as e:
        return f"--data-path {prefix}: cannot read {idx} ({e.strerror})"
    lengths, pointers, docs = index.sequence_lengths, index.sequence_pointers, index.document_indices
    expected = 34 + lengths.nbytes + pointers.nbytes + docs.nbytes
    if os.path.getsize(idx) != expected:
        return (f"--data-path {prefix}: {idx} has {os.path.getsize(idx)} bytes, its counts give {expected} "
                f"(truncated or altered); {remake}")
    if len(docs) < 2 or docs[0] != 0 or docs[-1] != len(lengths) or numpy.any(numpy.diff(docs) < 0):
        return f"--data-path {prefix}: {idx} holds no documents or inconsistent document boundaries; {remake}"
    if numpy.any(lengths < 0) or len(lengths) and (
            pointers[0] != 0 or numpy.any(numpy.diff(pointers) != lengths[:-1].astype(numpy.int64) * index.dtype_size)):
        return f"--data-path {prefix}: {idx} has inconsistent sequence offsets; {remake}"
    size = int(pointers[-1]) + int(lengths[-1]) * index.dtype_size if len(lengths) else 0
    if os.path.getsize(bin_) != size:
        return (f"--data-path {prefix}: {bin_} has {os.path.getsize(bin_)} bytes and {idx} describes {size} "
                f"({len(docs) - 1} documents of {numpy.dtype(index.dtype).name} tokens): the two files are not one dataset (or one is truncated); {remake}")
    return None


def largest_token_ids(prefixes: Sequence[str], part: int = 0, num_parts: int = 1) -> List[int]:
    """The largest token id in each dataset's .bin, reading only part ``part`` of ``num_parts``
    (ranks split the reading; the caller takes the maximum over parts). -1 for an empty part."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    out = []
    for prefix in prefixes:
        dtype = _IndexReader(prefix + ".idx", multimodal=False).dtype
        tokens = numpy.memmap(prefix + ".bin", dtype=dtype, mode="r")
        share = -(-len(tokens) // num_parts)
        largest = -1
        block = 1 << 26
        for start in range(part * share, min((part + 1) * share, len(tokens)), block):
            stop = min(start + block, (part + 1) * share, len(tokens))
            largest = max(largest, int(tokens[start:stop].max()))
        out.append(largest)
        del tokens
    return out


def tokens_beyond_vocabulary(prefixes: Sequence[str], largest: Sequence[int], vocab_size: int) -> Optional[str]:
    """The refusal when a dataset holds token ids the tokenizer (and so the model) does not have."""
    for prefix, top in zip(prefixes, largest):
        if top >= vocab_size:
            return (f"--data-path {prefix} holds token id {top}, and the tokenizer has {vocab_size} tokens: the "
                    f"dataset was made with another tokenizer; preprocess it with this run's tokenizer (or give "
                    f"the tokenizer it was made with)")
    return None


def build_datasets(config, tokenizer):
    """(train, valid, test) datasets sized for the whole run, as Megatron-LM sizes them."""
    t, data = config.training, config.data
    num_evals = t.train_iters // t.eval_interval + 1
    sizes = [config.train_samples_total, num_evals * t.eval_iters * t.global_batch_size,
             t.eval_iters * t.global_batch_size]
    dataset = dataset_config(config, tokenizer)
    if not data.mock_data:
        needed = ("train", "validation") if t.eval_iters else ("train",)
        dataset.split = resolve_split(data.split, dataset.blend[0], needed)
        dataset.__post_init__()  # recompute the split matrix
    cls = MockGPTDataset if data.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, dataset).build()


class MicroBatches:
    """Micro batches of one data-parallel rank, resumable from ``consumed_samples``.

    A global batch of G samples starting after c consumed covers samples [c, c+G); within it,
    micro batch m of data-parallel rank d is samples c + (m*D + d)*b ... + b - 1 (Megatron's
    pretraining sampler's order, so a batch ramp-up only changes where batches end).
    """

    def __init__(self, dataset, *, micro_batch_size, global_batch_size, dp_rank, dp_size, consumed_samples=0):
        self.dataset = dataset
        self.micro, self.global_ = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples

    def global_batch(self, global_batch_size: Optional[int] = None) -> Iterator[Dict[str, torch.Tensor]]:
        """The micro batches of the next global batch (of ``global_batch_size`` samples, default the
        constant one), as ``[b, S]`` tensors."""
        size = global_batch_size or self.global_
        start = self.consumed_samples
        self.consumed_samples += size
        for m in range(size // (self.micro * self.dp_size)):
            first = start + (m * self.dp_size + self.dp_rank) * self.micro
            samples = [self.dataset[(first + i) % len(self.dataset)] for i in range(self.micro)]
            yield {k: torch.stack([s[k] for s in samples]) for k in BATCH_KEYS}


def to_model_layout(batch, *, groups, num_chunks: Optional[int], device) -> Dict[str, torch.Tensor]:
    """This rank's piece of a ``[b, S]`` batch (FPDT layout when ``num_chunks``), on ``device``."""
    if num_chunks is not None:
        batch = fpdt_shard_batch(batch, sp_rank=groups.sp_rank, sp_size=groups.layout.fpdt_parallel_size,
                                 num_chunks=num_chunks)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
