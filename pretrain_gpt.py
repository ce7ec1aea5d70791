"""Pretrain a GPT model on megatron-core (FPDT with --fpdt).

    torchrun --nproc-per-node 2 pretrain_gpt.py --fpdt --fpdt-parallel-size 2 ... (Megatron flags)
"""

import sys

from megatron.training import pretrain

if __name__ == "__main__":
    sys.exit(pretrain(description=__doc__))
