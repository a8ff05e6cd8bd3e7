"""Round-to-nearest: the data-free baseline (optionally with MSE clip search per group)."""
from __future__ import annotations

from typing import Any

from pydantic.dataclasses import dataclass
from torch import nn

from ..quant import STRICT, quantize_weight
from ..registry import register
from .base import Quantizer, QuantizerConfig, check_weight


@dataclass(config=STRICT)
class RTNConfig(QuantizerConfig):
    """RTN options: the shared quantization arguments only (``mse=True`` adds a clip search)."""


@register("rtn")
class RTN(Quantizer):
    Config = RTNConfig

    @property
    def needs_data(self) -> bool:  # static activation scales need calibration inputs
        return self.config.activations == "static"

    def quantize(self, name: str, module: nn.Linear, stats: Any = None) -> nn.Module:
        w = module.weight.detach()
        check_weight(name, w)
        codes, scales, zeros = quantize_weight(w, self.config)   # [N, K], [N, G], [N, G]
        return self.build(name, module, codes, scales, zeros, stats=stats)
