"""The layer norms of an FPDT layer: torch's LayerNorm and RMSNorm, chunked.

Built by megatron-core like its WrappedTorchNorm (``config, hidden_size, eps``) and with
the same parameters (``weight``, and ``bias`` for LayerNorm), so checkpoints are unchanged.
Called on a whole sequence, a norm computes and backpropagates it chunk by chunk
(:func:`fpdt_ext.core.norm.chunked_norm`). :class:`~fpdt_ext.mcore.layer.FPDTTransformerLayer`
does not call its norms on the whole sequence at all where the module that follows can run them
inside its own chunk loop: it hands the norm over at forward time and that module normalises
each chunk with :meth:`ChunkedNorm.input_norm` (the norm's parameters).

With megatron-core's ``layernorm_zero_centered_gamma`` (``--apply-layernorm-1p``) every norm here
stores ``w`` initialised to zero and scales by ``1 + w``, as Megatron's and TransformerEngine's norms
do. :class:`TorchNorm` is the same norm unchunked, for the norms megatron-core would build as its
``WrappedTorchNorm``, which refuses zero-centred gamma (the baseline's local spec, q/k norms, the
final norm).
"""

from __future__ import annotations

import torch

from fpdt_ext.core.config import FPDTConfig
from fpdt_ext.core.norm import InputNorm, chunked_norm, normalize

Tensor = torch.Tensor


def _check(config) -> None:
    if config.sequence_parallel:
        raise ValueError("torch's norms here have no Megatron sequence parallelism")


def _zero_center(norm: torch.nn.Module, config) -> None:
    """Megatron's zero-centred gamma: the weight starts at zero (the norm scales by 1 + weight)."""
    norm.zero_centered = config.layernorm_zero_centered_gamma
    if norm.zero_centered:
        with torch.no_grad():
            norm.weight.zero_()


class TorchNorm(torch.nn.Module):
    """LayerNorm or RMSNorm (``config.normalization``) with WrappedTorchNorm's constructor and
    parameters (``weight``, and ``bias`` for LayerNorm), and zero-centred gamma when the config asks."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        _check(config)
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"TorchNorm supports LayerNorm and RMSNorm, got --normalization {config.normalization}")
        self.eps, self.rms = eps, config.normalization == "RMSNorm"
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size))
        _zero_center(self, config)

    def forward(self, x: Tensor) -> Tensor:
        return normalize(x, self.weight, self.bias, self.eps, self.rms, self.zero_centered)


class ChunkedNorm:
    """What the two norm classes below share (mixed into torch's norm modules)."""

    fpdt_config: FPDTConfig
    zero_centered: bool

    @property
    def rms(self) -> bool:
        return isinstance(self, torch.nn.RMSNorm)

    def input_norm(self) -> InputNorm:
        """This norm's parameters, for a loop that normalises each chunk itself."""
        return InputNorm(self.weight, getattr(self, "bias", None), self.eps, self.rms, self.zero_centered)

    def forward(self, x: Tensor) -> Tensor:  # [s/P, b, h]
        return chunked_norm(x, self.input_norm(), self.fpdt_config.local_chunks(x.shape[0]))


class ChunkedLayerNorm(ChunkedNorm, torch.nn.LayerNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, *, fpdt_config: FPDTConfig):
        _check(config)
        torch.nn.LayerNorm.__init__(self, hidden_size, eps=eps)
        self.fpdt_config = fpdt_config
        _zero_center(self, config)


class ChunkedRMSNorm(ChunkedNorm, torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, *, fpdt_config: FPDTConfig):
        _check(config)
        torch.nn.RMSNorm.__init__(self, hidden_size, eps=eps)
        self.fpdt_config = fpdt_config
        _zero_center(self, config)


CHUNKED_NORMS = {"LayerNorm": ChunkedLayerNorm, "RMSNorm": ChunkedRMSNorm}


def chunked_norm_class(normalization: str) -> type:
    """The chunked norm for megatron-core's ``--normalization`` value."""
    if normalization not in CHUNKED_NORMS:
        raise ValueError(f"FPDT's chunked norm supports {sorted(CHUNKED_NORMS)}, got --normalization {normalization}")
    return CHUNKED_NORMS[normalization]
