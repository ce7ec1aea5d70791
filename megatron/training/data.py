"""Batches: megatron-core's GPT datasets, a resumable sampler, and the FPDT layout.

Samples are ``[S]`` sequences from megatron-core's ``GPTDataset`` (or
``MockGPTDataset`` with ``--mock-data``). A global batch of G samples is split
over data-parallel ranks and micro batches in Megatron's order. Every rank of
an FPDT group reads the same samples and keeps its own piece in the FPDT
layout (:func:`fpdt_ext.core.layout.fpdt_shard_batch`): tokens, labels, loss mask
and position ids (the tokens' true global positions) are permuted together.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional

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


def build_datasets(config, tokenizer):
    """(train, valid, test) datasets sized for the whole run, as Megatron-LM sizes them."""
    t, data = config.training, config.data
    num_evals = t.train_iters // t.eval_interval + 1
    sizes = [t.train_iters * t.global_batch_size, num_evals * t.eval_iters * t.global_batch_size,
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

    Global batch n covers samples [n*G, (n+1)*G); within it, micro batch m of
    data-parallel rank d is samples n*G + (m*D + d)*b ... + b - 1.
    """

    def __init__(self, dataset, *, micro_batch_size, global_batch_size, dp_rank, dp_size, consumed_samples=0):
        self.dataset = dataset
        self.micro, self.global_ = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples

    def global_batch(self) -> Iterator[Dict[str, torch.Tensor]]:
        """The micro batches of the next global batch, as ``[b, S]`` tensors."""
        start = self.consumed_samples
        self.consumed_samples += self.global_
        for m in range(self.global_ // (self.micro * self.dp_size)):
            first = start + (m * self.dp_size + self.dp_rank) * self.micro
            samples = [self.dataset[(first + i) % len(self.dataset)] for i in range(self.micro)]
            yield {k: torch.stack([s[k] for s in samples]) for k in BATCH_KEYS}


def to_model_layout(batch, *, groups, num_chunks: Optional[int], device) -> Dict[str, torch.Tensor]:
    """This rank's piece of a ``[b, S]`` batch (FPDT layout when ``num_chunks``), on ``device``."""
    if num_chunks is not None:
        batch = fpdt_shard_batch(batch, sp_rank=groups.sp_rank, sp_size=groups.layout.fpdt_parallel_size,
                                 num_chunks=num_chunks)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
