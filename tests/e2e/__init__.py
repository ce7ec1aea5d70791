"""Entry points end to end: pretrain_*.py under torchrun, the tools, the launch scripts, the GPU check."""
