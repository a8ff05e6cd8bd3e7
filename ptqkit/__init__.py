"""ptqkit: calibration-based post-training quantization for large language models."""
from __future__ import annotations

__version__ = "0.1.0"

from .calibration.host import tune_malloc  # noqa: E402

tune_malloc()  # glibc: one malloc arena for the batch threads (PTQKIT_MALLOC_TUNE=lean|arena|0; calibration/host.py)

from .api import load, model_size_mb, quantize, save  # noqa: E402
from .models import load_model  # noqa: E402
from .registry import ALGORITHMS, register  # noqa: E402


def evaluate(*args, **kwargs):  # noqa: ANN002, ANN003
    """See :func:`ptqkit.evaluation.evaluate`."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = ["ALGORITHMS", "evaluate", "load", "load_model", "model_size_mb", "quantize", "register", "save",
           "tune_malloc"]
