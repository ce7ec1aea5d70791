"""Our training driver on megatron-core: arguments, initialisation, data, models, the loop.

``megatron`` itself is megatron-core's namespace package; this subpackage adds
``megatron.training`` to it (there is deliberately no ``megatron/__init__.py``).
"""

import logging
import warnings

# Benign notices megatron-core prints on every process of a run without the optional
# GPU packages (the fallbacks it names are the ones we want on the CPU).
for _message in ("Apex is not installed", "Transformer Engine and Apex are not installed",
                 "full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_message)


class _DropMessages(logging.Filter):
    def __init__(self, *fragments):
        super().__init__()
        self.fragments = fragments

    def filter(self, record):
        return not any(f in record.getMessage() for f in self.fragments)


# FPDT's MLP is a subclass megatron-core does not know by name; it gets its TP group
# explicitly from the FPDT spec, so the notice is noise.
logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_DropMessages("Unknown MLP type"))
logging.getLogger("megatron.core.datasets.gpt_dataset").addFilter(_DropMessages("Unable to save"))


def pretrain(*args, **kwargs):
    from megatron.training.training import pretrain as _pretrain

    return _pretrain(*args, **kwargs)
