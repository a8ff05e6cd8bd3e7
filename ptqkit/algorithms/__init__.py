"""Built-in algorithms; importing this package registers them."""
from . import awq, rotate, gptq, rtn, smoothquant  # noqa: F401
from .base import Algorithm, Quantizer, QuantizerConfig, Transform

__all__ = ["Algorithm", "Quantizer", "QuantizerConfig", "Transform"]
