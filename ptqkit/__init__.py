"""ptqkit: calibration-based post-training quantization for large language models."""
from __future__ import annotations

__version__ = "0.1.0"

from .api import load, load_model, model_size_mb, quantize, save  # noqa: E402
from .registry import ALGORITHMS, register  # noqa: E402


def evaluate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """See :func:`ptqkit.evaluation.evaluate` (imported on first use)."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = ["ALGORITHMS", "evaluate", "load", "load_model", "model_size_mb", "quantize", "register", "save"]
