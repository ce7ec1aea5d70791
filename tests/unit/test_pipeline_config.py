"""The pipeline's flags (Megatron-LM's names) and the layouts refused before anything is built."""

from __future__ import annotations

import pytest

from megatron.training.arguments import ArgumentError, parse_args, validate_args
from tests.helpers import TINY

FLAGS = [*TINY, "--num-layers", "8", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "1"]


def config(*extra, world=4):
    return validate_args(parse_args([*FLAGS, *extra]), world_size=world)


@pytest.mark.parametrize("extra, world, layers, chunks", [
    (["--pipeline-model-parallel-size", "2"], 2, [4, 4], 1),
    (["--pipeline-model-parallel-size", "4"], 8, [2, 2, 2, 2], 1),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"], 2, [4, 4], 2),
    (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "4"], 2, [4, 4], 4),
    (["--pipeline-model-parallel-size", "3", "--decoder-first-pipeline-num-layers", "2"], 3, [2, 3, 3], 1),
    (["--pipeline-model-parallel-size", "3", "--decoder-last-pipeline-num-layers", "4"], 3, [2, 2, 4], 1),
    (["--pipeline-model-parallel-size", "3", "--decoder-first-pipeline-num-layers", "2",
      "--decoder-last-pipeline-num-layers", "2"], 3, [2, 4, 2], 1),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "2",
      "--num-virtual-stages-per-pipeline-rank", "2"], 2, [2, 6], 2),
])
def test_stage_layers_follow_megatron_lm(extra, world, layers, chunks):
    par = config(*extra, world=world).parallel
    assert par.stage_layers(8) == layers and par.model_chunks == chunks


def test_the_data_parallel_size_leaves_out_the_stages():
    par = config("--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2", world=8).parallel
    assert par.data_parallel_size == 2


@pytest.mark.parametrize("extra, world, message", [
    (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 8 does not split over 3 pipeline stages"),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "9"], 2,
     "--num-layers 8 does not split over 2 pipeline stages with 9 on the first stage"),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "3",
      "--num-virtual-stages-per-pipeline-rank", "2"], 2, "each pipeline stage's layers ([3, 5]) must split into the 2"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     "--num-layers 8 is not a multiple of --pipeline-model-parallel-size 2 x --num-layers-per-virtual-pipeline-stage 3"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2",
      "--num-virtual-stages-per-pipeline-rank", "2"], 2, "give one of --num-layers-per-virtual-pipeline-stage and"),
    (["--pipeline-model-parallel-size", "4", "--num-virtual-stages-per-pipeline-rank", "2", "--global-batch-size",
      "2"], 4, "the interleaved pipeline schedule needs at least --pipeline-model-parallel-size (4) micro batches per "
               "iteration, and this run has 2"),
    (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2", "--rampup-batch-size",
      "1", "1", "8"], 2, "needs at least --pipeline-model-parallel-size (2) micro batches per iteration, and this "
                         "run has 1"),
    (["--num-virtual-stages-per-pipeline-rank", "2"], 1, "need --pipeline-model-parallel-size > 1"),
    (["--pipeline-model-parallel-size", "3"], 4, "world size 4 is not divisible by"),
    (["--use-torch-fsdp2", "--tensor-model-parallel-size", "2", "--swiglu"], 6,
     "--use-torch-fsdp2 with --swiglu and tensor parallelism needs an even number of data x FPDT ranks to shard "
     "over, not 3"),
])
def test_bad_layouts_say_what_to_change(extra, world, message):
    with pytest.raises(ArgumentError) as e:
        config(*extra, world=world)
    assert message in str(e.value)
