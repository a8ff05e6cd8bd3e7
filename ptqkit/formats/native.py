"""ptqkit's own checkpoint layout: an HF model directory whose quantized linears are stored as
their buffers (``qweight``, ``scales``, ``zeros``, ``perm``, ...) in ``model.safetensors``, with
``ptqkit_quant.json`` naming every quantized layer and its arguments. Written atomically, sharded
with an index over ``max_shard_size``; holds everything ptqkit can represent (ragged groups,
act-order, any bit width 2..8, W8A8)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..layers import QuantLinear, QuantLinearW8A8
from ..files import read_json
from .common import DEFAULT_SHARD_SIZE, finish_load, start_load, unique_state_dict, write_checkpoint

QUANT_FILE = "ptqkit_quant.json"
FORMAT_VERSION = 1


def layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every quantized layer of ``model`` with what is needed to rebuild an empty one."""
    specs = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            specs[name] = {"type": "wxa16", "in_features": m.in_features, "out_features": m.out_features,
                           "bits": m.bits, "group_size": m.group_size, "act_order": m.perm is not None,
                           "bias": m.bias is not None}
        elif isinstance(m, QuantLinearW8A8):
            specs[name] = {"type": "w8a8", "in_features": m.in_features, "out_features": m.out_features,
                           "static": m.input_scale is not None, "bias": m.bias is not None}
    return specs


def save_native(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None,
                extra: dict[str, Any] | None = None, report: Any = None,
                max_shard_size: int | str = DEFAULT_SHARD_SIZE, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (quantized or not) to ``path`` in ptqkit's layout; returns the path.

    Over ``max_shard_size`` the tensors go to shards with a ``model.safetensors.index.json``;
    ``report`` (an evaluation Report or a dict) is stored in ``ptqkit_report.json``; ``dtype`` casts the
    float tensors (scales included).
    """
    meta = {"format": "ptqkit", "version": FORMAT_VERSION, "layers": layer_specs(model),
            "info": getattr(model, "ptqkit_info", {}), **(extra or {})}
    return write_checkpoint(path, model, unique_state_dict(model), "native", tokenizer, report, max_shard_size, dtype=dtype,
                            extra=lambda tmp: (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=2, default=str)))


def empty_quant_layer(spec: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    if spec["type"] == "wxa16":
        return QuantLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                           bias=spec["bias"], act_order=spec["act_order"], dtype=dtype)
    if spec["type"] == "w8a8":
        return QuantLinearW8A8(spec["in_features"], spec["out_features"], bias=spec["bias"],
                               static=spec["static"], dtype=dtype)
    raise ValueError(f"unknown quantized layer type {spec['type']!r} in {QUANT_FILE}")


def load_native(path: str | os.PathLike, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_native` (single file or shards)."""
    path = Path(path)
    qfile = path / QUANT_FILE
    if not qfile.is_file():
        raise FileNotFoundError(f"{path} is not a ptqkit checkpoint (no {QUANT_FILE})")
    meta = read_json(qfile)
    if not isinstance(meta, dict) or not isinstance(meta.get("layers"), dict):
        raise ValueError(f"{qfile} has no 'layers' mapping: the checkpoint's index of quantized layers is damaged")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer ptqkit (format {meta['version']}); upgrade ptqkit")
    state, model, dtype = start_load(path, dtype)
    for name, spec in meta["layers"].items():
        try:
            layer = empty_quant_layer(spec, dtype)
            model.get_submodule(name)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: layer {name} in {QUANT_FILE} is not one the model has or its spec is "
                             f"incomplete ({type(e).__name__}: {e})") from None
        prefix = name + "."
        own = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        try:
            missing, unexpected = layer.load_state_dict(own, strict=False)
        except RuntimeError as e:
            raise ValueError(f"{path}: layer {name}: {str(e).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise ValueError(f"{path}: layer {name} does not match its spec "
                             f"(missing {missing}, unexpected {unexpected})")
        model.set_submodule(name, layer)
    return finish_load(model, state, path, device, meta.get("info", {}))
