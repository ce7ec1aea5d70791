"""Streamed export: read a checkpoint's model tensors one at a time, write sharded safetensors.

A 70B model does not fit in one process's memory in fp32 (280 GB), so export never builds it:

* :class:`CheckpointTensors` maps our model's state-dict names (``decoder.layers.3.mlp.linear_fc1.weight``)
  to the regions of the stored tensors that hold them (megatron-core stores a layer's weights as one
  slice of a tensor stacked over layers, in the TP-1 layout whatever TP size saved them) and reads a
  region from disk only when it is asked for, through torch.distributed.checkpoint's reader with a
  planner that asks for exactly that region. The names and regions come from our model built on the
  ``meta`` device (no memory).
* :class:`ShardWriter` takes the converted tensors in order and writes ``model-0000i-of-0000N.safetensors``
  files of at most ``max_shard_bytes`` each (one ``model.safetensors`` when all fit in one) and the
  index Hugging Face's ``from_pretrained`` reads; the number of shards is planned from the shapes
  before any weight is read.

Peak memory is about one shard (``--max-shard-size``) plus the largest tensor being converted:
``docs/STAGES.md`` ("Export at scale") has the measurement.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from typing import Dict, Iterable, Iterator, List, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from tools.checkpoint.checks import ConversionError
from tools.progress import Progress

# (stored key, offsets, sizes, this part's shape): a part of one of our tensors
Region = Tuple[str, Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]


def model_regions(model) -> Dict[str, List[Region]]:
    """Our state-dict name -> the stored regions whose concatenation (dim 0) is that tensor, from the
    model's megatron-core sharded state dict (built at TP 1: each part is a whole global slice)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    regions = {}
    for name, sharded in model.sharded_state_dict().items():
        if isinstance(sharded, ShardedTensorFactory):  # SwiGLU's fc1: stored as [gate; up] slices
            built = sharded.build()
            parts = list(built.values()) if isinstance(built, dict) else list(built)
            shape = tuple(sharded.data.shape)
        elif isinstance(sharded, ShardedTensor):
            parts, shape = [sharded], tuple(sharded.local_shape)
        else:  # _extra_state objects: nothing of the weights
            continue
        if any(not isinstance(p, ShardedTensor) or p.flattened_range is not None for p in parts) or \
                sum(p.local_shape[0] for p in parts) != shape[0]:
            raise RuntimeError(f"cannot map {name} onto stored regions: {parts}")
        regions[name] = [(p.key, tuple(p.global_offset), (1,) * p.prepend_axis_num + tuple(p.local_shape),
                          tuple(p.local_shape)) for p in parts]
    return regions


class _RegionPlanner(LoadPlanner):
    """Reads the requested regions of stored tensors into the given tensors, nothing else."""

    def __init__(self, requests: List[Tuple[Region, torch.Tensor]]):
        self.requests = requests
        self.targets = {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: List[ReadItem] = []
        for (key, offsets, sizes, _), target in self.requests:
            stored = self.metadata.state_dict_metadata.get(key)
            if not isinstance(stored, TensorStorageMetadata):
                raise ConversionError(f"the checkpoint has no tensor {key!r}: not a checkpoint of this model")
            if len(stored.size) != len(sizes) or any(o + s > g for o, s, g in zip(offsets, sizes, stored.size)):
                raise ConversionError(f"the checkpoint's {key!r} has shape {tuple(stored.size)}, which does not "
                                      f"hold {sizes} at {offsets}: not a checkpoint of this model")
            self.targets[(key, offsets)] = target.view(sizes)
            found = create_read_items_for_chunk_list(
                key, stored, [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))])
            if sum(item.lengths.numel() for item in found) != target.numel():
                raise ConversionError(f"the checkpoint does not hold all of {key!r} at {offsets}")
            items += found
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):
        raise RuntimeError("no object is read")

    def resolve_tensor(self, read_item):
        target = self.targets[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item, tensor):
        pass  # resolve_tensor handed out a view of the target: the data is in place


class CheckpointTensors(Mapping):
    """The model tensors of the checkpoint at ``path`` by our state-dict names, read from disk on
    each access (nothing is cached: a caller that keeps a tensor holds its memory)."""

    def __init__(self, path: str, meta_model):
        self.reader_path = path
        self.regions = model_regions(meta_model)
        self.dtypes = {name: t.dtype for name, t in meta_model.state_dict().items() if isinstance(t, torch.Tensor)}

    def __getitem__(self, name: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        parts = self.regions[name]
        out = torch.empty((sum(shape[0] for *_, shape in parts),) + parts[0][3][1:], dtype=self.dtypes[name])
        requests, row = [], 0
        for region in parts:
            requests.append((region, out[row:row + region[3][0]]))
            row += region[3][0]
        with warnings.catch_warnings():  # "torch.distributed ... uninitialized": one process, as meant
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({}, storage_reader=FileSystemReader(self.reader_path), planner=_RegionPlanner(requests),
                     no_dist=True)
        return out

    def __iter__(self):
        return iter(self.regions)

    def __len__(self):
        return len(self.regions)


class MetaTensors(Mapping):
    """The same names as :class:`CheckpointTensors`, as shape-only ``meta`` tensors: for planning."""

    def __init__(self, meta_model):
        self.tensors = {k: v for k, v in meta_model.state_dict().items() if isinstance(v, torch.Tensor)}

    def __getitem__(self, name):
        return self.tensors[name]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``5GB`` (Hugging Face's ``max_shard_size`` spelling: 10^9), ``500MiB``, ``1000000`` -> bytes."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a size (e.g. 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def plan_shards(sizes: Iterable[Tuple[str, int]], max_shard_bytes: int) -> List[List[str]]:
    """Tensors in order -> shards of at most ``max_shard_bytes`` each (a tensor larger than that gets a
    shard of its own, as Hugging Face does)."""
    shards: List[List[str]] = [[]]
    filled = 0
    for name, nbytes in sizes:
        if shards[-1] and filled + nbytes > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += nbytes
    return shards


def shard_file_names(count: int) -> List[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


INDEX = "model.safetensors.index.json"
_OURS = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")


class ShardWriter:
    """Writes tensors in the planned order into the planned shards; each file appears whole (written
    under a temporary name, then renamed), the index last, and weight files of an earlier export
    into the same folder that this one does not overwrite are removed at the end."""

    def __init__(self, save_dir: str, shards: List[List[str]], metadata: Dict[str, str]):
        self.save_dir, self.metadata = save_dir, metadata
        self.files = shard_file_names(len(shards))
        self.shard_of = {name: i for i, names in enumerate(shards) for name in names}
        self.file_of = {name: self.files[i] for name, i in self.shard_of.items()}
        self.pending = {i: set(names) for i, names in enumerate(shards)}
        self.buffer: Dict[str, torch.Tensor] = {}
        self.buffer_bytes = self.total_bytes = self.peak_buffer_bytes = 0

    def add(self, name: str, tensor: torch.Tensor):
        from safetensors.torch import save_file

        index = self.shard_of[name]
        self.buffer[name] = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        self.total_bytes += nbytes
        self.buffer_bytes += nbytes
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, self.buffer_bytes)
        self.pending[index].discard(name)
        if not self.pending[index]:
            path = os.path.join(self.save_dir, self.files[index])
            save_file(self.buffer, path + ".tmp", metadata=self.metadata)
            os.replace(path + ".tmp", path)
            self.buffer, self.buffer_bytes = {}, 0

    def finish(self):
        left = [name for names in self.pending.values() for name in names]
        if left:
            raise RuntimeError(f"export planned tensors it never produced: {left[:5]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.file_of}
            path = os.path.join(self.save_dir, INDEX)
            with open(path + ".tmp", "w") as f:
                json.dump(index, f, indent=1)
            os.replace(path + ".tmp", path)
        keep = set(self.files) | ({INDEX} if len(self.files) > 1 else set())
        for old in os.listdir(self.save_dir):
            if _OURS.match(old) and old not in keep:
                os.remove(os.path.join(self.save_dir, old))
        return self.files


def write_streamed(save_dir: str, tensors: Iterator[Tuple[str, torch.Tensor]],
                   planned: List[Tuple[str, int]], max_shard_bytes: int, progress: bool = False) -> ShardWriter:
    """Drain ``tensors`` ((name, tensor) in the order of ``planned``'s (name, bytes)) into shards;
    with ``progress``, bytes written (rate, time left), tensors and the shard being filled on stderr."""
    writer = ShardWriter(save_dir, plan_shards(planned, max_shard_bytes), {"format": "pt"})
    with Progress(sum(nbytes for _, nbytes in planned), "export", unit="B", enabled=progress) as bar:
        for count, (name, tensor) in enumerate(tensors, start=1):
            writer.add(name, tensor)
            bar.update(tensor.numel() * tensor.element_size(), tensors=f"{count}/{len(planned)}",
                       shard=f"{writer.shard_of[name] + 1}/{len(writer.files)}")
        writer.finish()
    return writer


__all__ = ["CheckpointTensors", "MetaTensors", "ShardWriter", "model_regions", "parse_size", "plan_shards",
           "shard_file_names", "write_streamed"]
