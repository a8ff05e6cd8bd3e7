"""Built-in algorithms; importing this package registers them."""
from . import awq, rtn  # noqa: F401
from . import smoothquant  # noqa: F401
from . import gptq  # noqa: F401
from .base import Algorithm, Quantizer, QuantizerConfig, Transform

__all__ = ["Algorithm", "Quantizer", "QuantizerConfig", "Transform"]
