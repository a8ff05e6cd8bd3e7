"""Built-in algorithms; importing this package registers them."""
from . import (  # noqa: F401
    awq,
    rotate,
    gptq,  # noqa: F401
    rtn,
    smoothquant,  # noqa: F401
)
from .base import Algorithm, Quantizer, QuantizerConfig, Transform

__all__ = ["Algorithm", "Quantizer", "QuantizerConfig", "Transform"]
