"""Checkpoint formats: ``save(model, path, format=...)`` and ``load(path)``.

``SAVERS`` maps a format name to its writer (``ptqkit quantize --format`` offers these names);
``LOADERS`` is the ordered list of ``(name, detect, loader)`` that :func:`load` tries. Every saver
takes ``(model, path, tokenizer=None, report=None, max_shard_size=..., **format_options)``,
writes atomically and returns the final path.

| format | layers it holds | options |
|---|---|---|
| ``native`` | everything ptqkit builds (any bits, ragged groups, act-order, W8A8) | |
| ``gptq`` | weight-only 2/3/4/8 bits; K divisible by the group size; act-order | ``checkpoint_format``, ``dtype`` |
| ``awq`` | weight-only 4 bits; K divisible by the group size; no grouped act-order | ``dtype`` |
| ``compressed-tensors`` | 1–8-bit weight-only, W8A8; no ragged groups or grouped act-order | ``dtype`` |

``checkpoint_format``: ``gptq`` (v1, what vLLM and AutoGPTQ read) or ``gptq_v2`` (GPTQModel's).
``dtype``: cast scales and float weights (e.g. ``torch.float16``); default: keep the model's.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .awq import is_awq, load_awq, save_awq
from .common import REPORT_FILE
from .compressed_tensors import is_compressed_tensors, load_compressed_tensors, save_compressed_tensors
from .gptq import is_gptq, load_gptq, save_gptq
from .native import QUANT_FILE, load_native, save_native

SAVERS: dict[str, Callable[..., Path]] = {
    "native": save_native,
    "gptq": save_gptq,
    "awq": save_awq,
    "compressed-tensors": save_compressed_tensors,
}
LOADERS: list[tuple[str, Callable[[Path], bool], Callable[..., nn.Module]]] = [
    ("native", lambda p: (p / QUANT_FILE).is_file(), load_native),
    ("gptq", is_gptq, load_gptq),
    ("awq", is_awq, load_awq),
    ("compressed-tensors", is_compressed_tensors, load_compressed_tensors),
]
_ALIASES = {"ct": "compressed-tensors", "compressed_tensors": "compressed-tensors", "ptqkit": "native"}

__all__ = ["LOADERS", "REPORT_FILE", "SAVERS", "detect", "load", "save"]


def save(model: nn.Module, path: str | os.PathLike, format: str = "native", tokenizer: Any = None,
         report: Any = None, **kw: Any) -> Path:
    """Write ``model`` to ``path`` in ``format`` (see the table above); ``report`` (an evaluation
    Report or a dict) goes into ``ptqkit_report.json`` with the recipe and calibration fingerprint."""
    fmt = _ALIASES.get(format, format)
    if fmt not in SAVERS:
        raise ValueError(f"unknown format {format!r}: choose one of {sorted(SAVERS)}")
    return SAVERS[fmt](model, path, tokenizer=tokenizer, report=report, **kw)


def detect(path: str | os.PathLike) -> str | None:
    """The format of the checkpoint directory at ``path``, or ``None`` if ptqkit reads none."""
    p = Path(path)
    if not p.is_dir():
        return None
    return next((name for name, test, _ in LOADERS if test(p)), None)


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A ptqkit model (``QuantLinear`` / ``QuantLinearW8A8`` layers) from a checkpoint in any format
    of :data:`LOADERS`, written by ptqkit or by another tool; ``dtype`` overrides the checkpoint's."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    for name, test, loader in LOADERS:
        if test(p):
            return loader(p, device=device, dtype=dtype)
    raise ValueError(f"{path} holds no checkpoint ptqkit can read: it needs {QUANT_FILE} (native) or a config.json "
                     f"whose quantization_config has quant_method gptq, awq or compressed-tensors")
