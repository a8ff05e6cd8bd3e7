"""ptqkit's own checkpoint layout: an HF model directory whose quantized linears are stored as
their buffers (``qweight``, ``scales``, ``zeros``, ``perm``, ...) in ``model.safetensors``, with
``ptqkit_quant.json`` naming every quantized layer and its arguments. Written atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..layers import QuantLinear, QuantLinearW8A8
from ..models import set_submodule

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


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the second copy of tied tensors (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict().items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel() > 0:
            continue
        seen.add(ptr)
        out[k] = v.detach().contiguous()
    return out


def atomic_dir(path: str | os.PathLike) -> tuple[Path, Path]:
    """A fresh temporary directory beside ``path``; :func:`commit_dir` renames it into place."""
    final = Path(path).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent)), final


def commit_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp``: the old content stays until the new one is complete."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_native(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None,
                extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (quantized or not) to ``path`` in ptqkit's layout; returns the path."""
    from safetensors.torch import save_file

    tmp, final = atomic_dir(path)
    try:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_file(unique_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        meta = {"format": "ptqkit", "version": FORMAT_VERSION, "layers": layer_specs(model),
                "info": getattr(model, "ptqkit_info", {}), **(extra or {})}
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        commit_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def empty_quant_layer(spec: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    if spec["type"] == "wxa16":
        return QuantLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                           bias=spec["bias"], act_order=spec["act_order"], dtype=dtype)
    if spec["type"] == "w8a8":
        return QuantLinearW8A8(spec["in_features"], spec["out_features"], bias=spec["bias"],
                               static=spec["static"], dtype=dtype)
    raise ValueError(f"unknown quantized layer type {spec['type']!r} in {QUANT_FILE}")


def load_native(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_native`."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    qfile = path / QUANT_FILE
    if not qfile.is_file():
        raise FileNotFoundError(f"{path} is not a ptqkit checkpoint (no {QUANT_FILE})")
    meta = json.loads(qfile.read_text())
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer ptqkit (format {meta['version']}); upgrade ptqkit")
    config = AutoConfig.from_pretrained(path)
    state = load_file(str(path / "model.safetensors"))
    dtype = next((v.dtype for k, v in state.items() if v.is_floating_point()), torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, spec in meta["layers"].items():
        set_submodule(model, name, empty_quant_layer(spec, dtype))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    model.ptqkit_info = meta.get("info", {})
    model.config.use_cache = False
    return model.eval().to(device)
