"""FPDT on megatron-core: long-context training with the Fully Pipelined Distributed Transformer."""

from setuptools import find_namespace_packages, setup

setup(
    name="fpdt-megatron",
    version="0.1.0",
    description="FPDT (Fully Pipelined Distributed Transformer) for megatron-core: chunked, offloading, "
                "pipelined attention, MLP and loss for training on millions of tokens",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # `megatron` is a namespace package shared with megatron-core: ours adds megatron.training.
    packages=find_namespace_packages(include=["fpdt_ext", "fpdt_ext.*", "megatron.training", "megatron.training.*"]),
    install_requires=[
        # Tested on the CPU with torch 2.13 (Python 3.11); on one GPU (H200, torch 2.11 + CUDA 13,
        # Python 3.12) by bench/gpu_check.sh. Several GPUs: untested (docs/GPU_PATHS.md).
        "torch>=2.4,<2.15",
        # 0.16.x is the newest on Python 3.11 and installs on 3.12 too: one API everywhere.
        "megatron-core>=0.16.1,<0.17",
        "einops",  # megatron-core's Megatron-FSDP adapter (--use-megatron-fsdp) needs it without declaring it
        "numpy",
        "psutil",  # megatron-core's dist_checkpointing needs it without declaring it
        "sentencepiece>=0.2",  # SentencePieceTokenizer / Llama2Tokenizer
        "tokenizers>=0.20",  # GPT2BPETokenizer / HuggingFaceTokenizer (local files only)
        "safetensors>=0.4",  # tools/checkpoint/convert.py reads and writes Hugging Face weights
        "tqdm>=4.60",  # tools/progress.py: the tools' and benchmarks' progress on stderr
    ],
    extras_require={
        # All optional at run time: the code picks them up when importable.
        # NVIDIA apex is not on PyPI (the PyPI package "apex" is unrelated): build it from
        # https://github.com/NVIDIA/apex if you want its fused kernels.
        "gpu": ["flash-attn>=2.5,<3", "transformer-engine[pytorch]>=1.13"],
        # tiktoken: the GPT-2 reference in tests; transformers: the reference models of the conversion tests;
        # tensorboard and wandb: --tensorboard-dir and --wandb-project (optional at run time; the tests read
        # the event files back and run W&B offline)
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "tiktoken>=0.7", "transformers>=4.45", "tensorboard>=2.14",
                "wandb>=0.17"],
    },
)
