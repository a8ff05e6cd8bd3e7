"""Checkpoint formats: ``save(model, path, format=...)`` and ``load(path)``.

``SAVERS`` maps a format name to its writer (``ptqkit quantize --format`` offers these names);
``LOADERS`` is the ordered list of ``(name, detect, loader)`` that :func:`load` tries. Every saver
takes ``(model, path, tokenizer=None, report=None, max_shard_size=..., **format_options)``,
writes atomically and returns the final path.

| format | layers it holds | options |
|---|---|---|
| ``auto`` (default) | picks compressed-tensors where vLLM reads it, else gptq/awq, else native (:func:`.serving.best`) | |
| ``native`` | everything ptqkit builds (any bits, ragged groups, act-order, W8A8) | |
| ``gptq`` | weight-only 2/3/4/8 bits; K divisible by the group size; act-order (``g_idx``) | ``checkpoint_format`` |
| ``awq`` | weight-only 4 bits; K divisible by the group size; no grouped act-order | |
| ``compressed-tensors`` | 1–8-bit weight-only, W8A8 static/dynamic; no ragged groups or grouped act-order | |

Every saver takes ``dtype``: the float dtype on disk (scales, embeddings, norms); default: the dtype the
model is published in (``model.ptqkit_source_dtype``, bf16 for SmolLM2), else the model's own.
``checkpoint_format``: ``gptq`` (v1, what vLLM and AutoGPTQ read) or ``gptq_v2`` (GPTQModel's).
What each serving engine reads per format: :mod:`.serving` (the rules) and docs/serving.md (the commands).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..files import check_output
from . import awq, compressed_tensors, gptq, native, serving
from ..layers import QuantLinear, QuantLinearW8A8
from .common import REPORT_FILE, has_quant_method, quant_layers
from .native import QUANT_FILE

SAVERS: dict[str, Callable[..., Path]] = {
    "native": native.save_native,
    "gptq": gptq.save_gptq,
    "awq": awq.save_awq,
    "compressed-tensors": compressed_tensors.save_compressed_tensors,
}
LOADERS: list[tuple[str, Callable[[Path], bool], Callable[..., nn.Module]]] = [
    ("native", lambda p: (p / QUANT_FILE).is_file(), native.load_native),
    ("gptq", lambda p: has_quant_method(p, "gptq"), gptq.load_gptq),
    ("awq", lambda p: has_quant_method(p, "awq"), awq.load_awq),
    ("compressed-tensors", lambda p: has_quant_method(p, "compressed-tensors"), compressed_tensors.load_compressed_tensors),
]
_ALIASES = {"ct": "compressed-tensors", "compressed_tensors": "compressed-tensors", "ptqkit": "native"}
FORMATS = ["auto", *SAVERS]  # what --format offers: auto first

log = logging.getLogger(__name__)

__all__ = ["LOADERS", "REPORT_FILE", "SAVERS", "detect", "load", "save"]


def save(model: nn.Module, path: str | os.PathLike, format: str = "auto", tokenizer: Any = None,
         report: Any = None, overwrite: bool = False, **kw: Any) -> Path:
    """Write ``model`` to ``path`` in ``format`` (see the table above; ``auto``: the format the most serving
    engines read, :mod:`.serving`); ``report`` (an evaluation Report or a dict) goes into
    ``ptqkit_report.json`` with the recipe and calibration fingerprint. A scheme no engine reads in the
    format is refused, one some engines do not read is saved with a warning. An existing ``path`` is
    replaced only with ``overwrite=True`` and only when it holds a ptqkit output (``files.check_output``).
    ``dtype``: the float dtype on disk (default: the one the model is published in)."""
    fmt = _ALIASES.get(format, format)
    if fmt not in SAVERS and fmt != "auto":
        raise ValueError(f"unknown format {format!r}: choose one of {FORMATS}")
    check_output(path, overwrite, source_dirs(model), "checkpoint path")
    if kw.get("dtype") is None:  # the dtype the model is published in (bf16 for the default), not the fp32 of calibration
        kw["dtype"] = getattr(model, "ptqkit_source_dtype", None)
    scheme = serving.scheme_of(model, kw["dtype"], kw.get("checkpoint_format", "gptq"))
    if fmt == "auto":
        fmt = serving.best(scheme) if scheme is not None else "native"
    if scheme is not None:
        layers = quant_layers(model)
        first = next(iter(layers.values()))
        for name, m in layers.items():  # what the format cannot hold, named by layer, before who reads it
            _layer_check(fmt, name, m, first, kw.get("checkpoint_format", "gptq"))
        serving.check(fmt, scheme)
    log.info("writing %s, %s: %s", fmt, kw["dtype"] or "the model's dtype", serving.summary(fmt, scheme))
    return SAVERS[fmt](model, path, tokenizer=tokenizer, report=report, **kw)


def served_by(model: nn.Module, path: str | os.PathLike) -> str:
    """``"<format>: read by ..."`` for a checkpoint ``model`` was just saved to."""
    fmt = detect(path) or "?"
    dtype = getattr(model, "ptqkit_source_dtype", None)
    return f"{fmt}: {serving.summary(fmt, serving.scheme_of(model, dtype))}"


def _layer_check(fmt: str, name: str, m: nn.Module, first: nn.Module, version: str = "gptq") -> None:
    """The format's own refusal of one layer (``first``: the layer whose grid the checkpoint takes)."""
    bits, group = getattr(first, "bits", 8), getattr(first, "group_size", -1)
    if fmt == "gptq":
        gptq.check_layer(name, m, bits, group, version)
    elif fmt == "awq":
        awq.check_layer(name, m, group)
    elif fmt == "compressed-tensors":
        compressed_tensors.layer_scheme(name, m)


def check_plan(format: str, qcfg: Any, shapes: dict[str, tuple[int, int]], dtype: torch.dtype = torch.bfloat16) -> None:
    """Refuse, before anything is quantized, a scheme ``format`` cannot hold or no serving engine reads
    (``qcfg``: the quantizer's config; ``shapes``: ``name -> (in_features, out_features)``)."""
    scheme = serving.planned(qcfg, shapes, dtype)
    fmt = _ALIASES.get(format, format)
    fmt = serving.best(scheme) if fmt == "auto" else fmt
    if fmt == "native":
        return
    for name, (k, n) in shapes.items():  # the format's own per-layer checks on empty layers of the grid
        if qcfg.activations is not None:
            layer: nn.Module = QuantLinearW8A8(k, n, device="meta")
        else:
            layer = QuantLinear(k, n, qcfg.bits, qcfg.group_size, act_order=scheme.act_order)
            layer.zeros.fill_(0 if not qcfg.sym else 2 ** (qcfg.bits - 1))  # asymmetric grids can have 0
        _layer_check(fmt, name, layer, layer)
    serving.check(fmt, scheme)


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
