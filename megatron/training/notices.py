"""megatron-core's benign notices, silenced by the entry points that ask for it.

Called once at the start of a run (``pretrain``, the tools), before megatron-core is imported:
importing ``megatron.training`` itself changes no warning or logging setting.
"""

from __future__ import annotations

import logging
import warnings

# Printed on every process of a run without the optional GPU packages: the fallbacks they name
# are the ones we want on the CPU.
_WARNINGS = ("Apex is not installed", "Transformer Engine and Apex are not installed", "full scope is deprecated")
# FPDT's MLP is a subclass megatron-core does not know by name (it gets its TP group from the FPDT
# spec); a dataset cache that cannot be written is rebuilt in memory.
_LOG_MESSAGES = {"megatron.core.transformer.transformer_layer": "Unknown MLP type",
                 "megatron.core.datasets.gpt_dataset": "Unable to save"}


class _DropMessages(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record):
        return self.fragment not in record.getMessage()


def quiet_known_notices() -> None:
    """Silence the notices above in this process (idempotent)."""
    for message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for logger_name, fragment in _LOG_MESSAGES.items():
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMessages) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropMessages(fragment))
