"""The layer norms of an FPDT layer: torch's LayerNorm and RMSNorm, chunked.

Built by megatron-core like its WrappedTorchNorm (``config, hidden_size, eps``) and with
the same parameters (``weight``, and ``bias`` for LayerNorm), so checkpoints are unchanged.
Called on a whole sequence, a norm computes and backpropagates it chunk by chunk
(:func:`fpdt_ext.core.norm.chunked_norm`). :class:`~fpdt_ext.mcore.layer.FPDTTransformerLayer`
does not call its norms on the whole sequence at all where the module that follows can run them
inside its own chunk loop: it hands the norm over at forward time and that module normalises
each chunk with :meth:`ChunkedNorm.input_norm` (the norm's parameters).
"""

from __future__ import annotations

import torch

from fpdt_ext.core.config import FPDTConfig
from fpdt_ext.core.norm import InputNorm, chunked_norm

Tensor = torch.Tensor


class ChunkedNorm:
    """What the two norm classes below share (mixed into torch's norm modules)."""

    fpdt_config: FPDTConfig

    @staticmethod
    def _check(config) -> None:
        if config.layernorm_zero_centered_gamma or config.sequence_parallel:
            raise ValueError("FPDT's chunked norm has no zero-centred gamma and no Megatron sequence parallelism")

    @property
    def rms(self) -> bool:
        return isinstance(self, torch.nn.RMSNorm)

    def input_norm(self) -> InputNorm:
        """This norm's parameters, for a loop that normalises each chunk itself."""
        return InputNorm(self.weight, getattr(self, "bias", None), self.eps, self.rms)

    def forward(self, x: Tensor) -> Tensor:  # [s/P, b, h]
        return chunked_norm(x, self.input_norm(), self.fpdt_config.local_chunks(x.shape[0]))


class ChunkedLayerNorm(ChunkedNorm, torch.nn.LayerNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, *, fpdt_config: FPDTConfig):
        self._check(config)
        torch.nn.LayerNorm.__init__(self, hidden_size, eps=eps)
        self.fpdt_config = fpdt_config


class ChunkedRMSNorm(ChunkedNorm, torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, *, fpdt_config: FPDTConfig):
        self._check(config)
        torch.nn.RMSNorm.__init__(self, hidden_size, eps=eps)
        self.fpdt_config = fpdt_config


CHUNKED_NORMS = {"LayerNorm": ChunkedLayerNorm, "RMSNorm": ChunkedRMSNorm}


def chunked_norm_class(normalization: str) -> type:
    """The chunked norm for megatron-core's ``--normalization`` value."""
    if normalization not in CHUNKED_NORMS:
        raise ValueError(f"FPDT's chunked norm supports {sorted(CHUNKED_NORMS)}, got --normalization {normalization}")
    return CHUNKED_NORMS[normalization]
