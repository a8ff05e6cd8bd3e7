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

from ..files import check_output
from ..layers import QuantLinear, QuantLinearW8A8
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
         report: Any = None, overwrite: bool = False, **kw: Any) -> Path:
    """Write ``model`` to ``path`` in ``format`` (see the table above); ``report`` (an evaluation
    Report or a dict) goes into ``ptqkit_report.json`` with the recipe and calibration fingerprint.
    An existing ``path`` is replaced only with ``overwrite=True`` and only when it holds a ptqkit output
    (:func:`ptqkit.files.check_output`)."""
    fmt = _ALIASES.get(format, format)
    if fmt not in SAVERS:
        raise ValueError(f"unknown format {format!r}: choose one of {sorted(SAVERS)}")
    check_output(path, overwrite, source_dirs(model), "checkpoint path")
    if kw.get("dtype") is None:  # the dtype the model is published in (bf16 for the default), not the fp32 of calibration
        kw["dtype"] = getattr(model, "ptqkit_source_dtype", None)
    return SAVERS[fmt](model, path, tokenizer=tokenizer, report=report, **kw)


def check_plan(format: str, qcfg: Any, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse, before anything is quantized, a scheme ``format`` cannot hold: the format's own per-layer
    checks run on empty layers of the planned grid (``qcfg``: the quantizer's config) and ``shapes``
    (``name -> (in_features, out_features)``)."""
    from . import awq, compressed_tensors, gptq

    fmt = _ALIASES.get(format, format)
    checks = {"gptq": lambda n, m: gptq.check_layer(n, m, getattr(m, "bits", 8), getattr(m, "group_size", -1), "gptq"),
              "awq": lambda n, m: awq.check_layer(n, m, getattr(m, "group_size", -1)),
              "compressed-tensors": compressed_tensors.layer_scheme}
    if fmt not in checks:
        return
    perm = getattr(qcfg, "act_order", False) and not getattr(qcfg, "static_groups", True)
    for name, (k, n) in shapes.items():
        if qcfg.activations is not None:
            layer: nn.Module = QuantLinearW8A8(k, n, device="meta")
        else:
            layer = QuantLinear(k, n, qcfg.bits, qcfg.group_size, act_order=perm)
            layer.zeros.fill_(0 if not qcfg.sym else 2 ** (qcfg.bits - 1))  # asymmetric grids can have 0
        checks[fmt](name, layer)


def source_dirs(model: nn.Module) -> list[str]:
    """Local directories the model was loaded from (a checkpoint must never be written over them)."""
    names = [getattr(getattr(model, "config", None), "_name_or_path", None),
             (getattr(model, "ptqkit_info", None) or {}).get("source_dir")]
    return [n for n in names if isinstance(n, str) and n and Path(n).is_dir()]


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
