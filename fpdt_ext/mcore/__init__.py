"""FPDT in megatron-core: the layer spec, its modules, the chunked loss, the model, the process groups.

Named ``mcore`` rather than ``megatron`` so that ``megatron`` in an import always means the
top-level namespace package (megatron-core's ``megatron.core`` and our ``megatron.training``).
"""
