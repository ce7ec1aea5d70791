"""The FPDT algorithm in plain torch (no megatron-core import)."""
