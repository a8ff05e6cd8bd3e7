"""``rotate``: a randomized Hadamard rotation of the residual stream (R1) and of each attention head's value
space (R2), folded into the weights before calibration (QuaRot, Ashkboos et al. 2024). The math is in
:mod:`ptqkit.rotation`; this step puts it in a recipe: ``["rotate", "gptq"]``, ``["rotate", "awq", "gptq"]``."""
from __future__ import annotations

from pydantic.dataclasses import dataclass
from torch import nn

from ..quant import STRICT
from ..registry import register
from ..rotation import rotate_model_
from .base import Transform


@dataclass(config=STRICT)
class RotateConfig:
    """``per_head``: also rotate each head's value / output space (R2); ``rotation_seed``: the random signs."""

    per_head: bool = True
    rotation_seed: int = 0


@register("rotate")
class Rotate(Transform):
    Config = RotateConfig
    needs_data = False
    whole_model = True

    def prepare_model(self, model: nn.Module) -> dict:
        return rotate_model_(model, self.config.per_head, self.config.rotation_seed)
