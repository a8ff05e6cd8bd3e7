"""What every checkpoint format shares: one atomic write, sharded safetensors with an index,
the files that travel with a model (config, generation config, tokenizer, ``ptqkit_report.json``)
and rebuilding an empty model from a checkpoint's ``config.json``."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..architectures import architecture, hub_name, prepare_model
from ..files import atomic_dir, plain_mode, read_json
from ..layers import QuantLinear, QuantLinearW8A8

log = logging.getLogger(__name__)

SAFE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
REPORT_FILE = "ptqkit_report.json"
DEFAULT_SHARD_SIZE = "5GB"


# ---------------------------------------------------------------- sharded safetensors
def save_tensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_size: int | str = DEFAULT_SHARD_SIZE,
                 metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as ``model.safetensors``, or as ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` (the Hugging Face layout) when over ``max_shard_size``."""
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict({k: v.detach().cpu() for k, v in tensors.items()}, directory,
                          max_shard_size=max_shard_size, metadata={"format": "pt", **(metadata or {})})
    for f in Path(directory).glob("*.safetensors"):  # safetensors writes 0600: readable like any other file
        plain_mode(f)


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: {path.name} is missing (named in {INDEX_FILE})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): the checkpoint is damaged or "
                         "truncated; write it again") from None


def load_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors`` or of the shards named in its index."""
    d = Path(directory)
    if (d / INDEX_FILE).is_file():
        index = read_json(d / INDEX_FILE)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise ValueError(f"{d / INDEX_FILE} has no weight_map: the checkpoint index is damaged")
        return {k: v for fname in sorted(set(index["weight_map"].values())) for k, v in _load_file(d / fname).items()}
    if (d / SAFE_FILE).is_file():
        return _load_file(d / SAFE_FILE)
    raise FileNotFoundError(f"{d} holds neither {SAFE_FILE} nor {INDEX_FILE}")


# ---------------------------------------------------------------- model <-> directory
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


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``QuantLinear`` / ``QuantLinearW8A8`` of ``model`` by full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantLinearW8A8))}


def checkpoint_tensors(model: nn.Module, layers: dict[str, nn.Module],
                       convert: Callable[[str, nn.Module], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A foreign format's tensors: the state dict minus the quantized layers' buffers (embeddings, norms,
    lm_head, fp linears), then ``name.key`` for every ``key`` of ``convert(name, layer)`` and the layer's bias."""
    skip = tuple(n + "." for n in layers)
    tensors = {k: v for k, v in unique_state_dict(model).items() if not k.startswith(skip)}
    for name, m in layers.items():
        tensors.update({f"{name}.{key}": v for key, v in convert(name, m).items()})
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias
    return tensors


def write_checkpoint(path: str | os.PathLike, model: nn.Module, tensors: dict[str, torch.Tensor], fmt: str,
                     tokenizer: Any = None, report: Any = None, max_shard_size: int | str = DEFAULT_SHARD_SIZE,
                     quantization_config: dict[str, Any] | None = None, dtype: torch.dtype | None = None,
                     extra: Callable[[Path], None] | None = None) -> Path:
    """A whole checkpoint in one atomic write: config.json (with ``quantization_config`` when given),
    generation_config.json, the tokenizer files and ``ptqkit_report.json``, then ``extra(tmp)`` (the format's
    own files), then ``tensors`` with the floating ones cast to ``dtype`` (sharded over ``max_shard_size``);
    returns the final path."""
    with atomic_dir(path) as tmp:
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
            config.pop("torch_dtype", None)
        if quantization_config is not None:
            config["quantization_config"] = quantization_config
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_report(tmp, model, fmt, report)
        if extra is not None:
            extra(tmp)
        arch = architecture(model)  # the family's hub names (per-expert projections, Mixtral's block_sparse_moe)
        save_tensors({hub_name(k, arch): v.to(dtype) if dtype is not None and v.is_floating_point() else v
                      for k, v in tensors.items()}, tmp, max_shard_size)
    return Path(path).resolve()


def write_report(directory: Path, model: nn.Module, fmt: str | None, report: Any = None) -> None:
    """``ptqkit_report.json``: how the model was quantized (recipe, options, calibration
    fingerprint, timings) and, when given, the evaluation metrics (a Report or a dict);
    ``fmt`` is the checkpoint's format (``None``: no checkpoint beside it)."""
    from .. import __version__

    info = dict(getattr(model, "ptqkit_info", None) or {})
    if hasattr(report, "to_dict"):
        report = report.to_dict()
    if report is not None and not isinstance(report, dict):
        raise TypeError(f"report must be a ptqkit Report or a dict, got {type(report).__name__}")
    data = {
        "ptqkit_version": __version__,
        "format": fmt,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": info.get("method"),
        "recipe": info.get("recipe"),
        "calibration_fingerprint": info.get("calibration_fingerprint"),
        "quantization": info,
        "metrics": report,
    }
    (directory / REPORT_FILE).write_text(json.dumps(data, indent=2, default=str) + "\n")


def read_info(directory: Path) -> dict[str, Any]:
    """``ptqkit_info`` back from ``ptqkit_report.json`` (empty when the checkpoint has none)."""
    f = directory / REPORT_FILE
    if not f.is_file():
        return {}
    data = read_json(f)
    if not isinstance(data, dict):  # e.g. ``null`` written over it: the weights are still the checkpoint's
        log.warning("%s is not a JSON object (%s): the checkpoint's quantization report is ignored", f,
                    type(data).__name__)
        return {}
    if "quantization" in data:
        return dict(data["quantization"] or {})
    # a bare evaluation Report written over the file: keep what it says about the quantization
    return {k: data[k] for k in ("method", "config", "calibration_fingerprint") if data.get(k) is not None}


def quantization_config(directory: Path) -> dict[str, Any] | None:
    """``config.json``'s ``quantization_config`` (``None`` when absent)."""
    config = read_json(directory / "config.json")
    return config.get("quantization_config") if isinstance(config, dict) else None


def empty_model(directory: Path, dtype: torch.dtype | None, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A full-precision model skeleton from ``config.json`` (its ``quantization_config`` dropped, so
    transformers does not try to quantize it); dtype: ``dtype``, else that of the checkpoint's
    first floating tensor that is not a scale."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if dtype is None:
        dtype = next((v.dtype for k, v in tensors.items()
                      if v.is_floating_point() and "scale" not in k.rsplit(".", 1)[-1]), torch.float32)
    try:  # every weight is overwritten by the checkpoint: skip the random initialisation
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def finish_load(model: nn.Module, state: dict[str, torch.Tensor], directory: Path, device: str | torch.device,
                info: dict[str, Any]) -> nn.Module:
    """Load the remaining (float) tensors strictly, tie embeddings, attach ``ptqkit_info``."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape: name it
        raise ValueError(f"{directory}: checkpoint does not match its config.json: {str(e).splitlines()[-1].strip()}") from None
    done = tuple(n + "." for n in quant_layers(model))          # filled by the format's loader
    missing = {k for k in missing if not k.startswith(done)}
    if getattr(model.config, "tie_word_embeddings", False):
        missing.discard("lm_head.weight")
    if unexpected or missing:
        raise ValueError(f"{directory}: checkpoint does not match the model (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    model.ptqkit_info = info
    return model.eval().to(device)


# ---------------------------------------------------------------- what the formats share on save
def layer_bits_error(fmt: str, name: str, problem: str, fix: str) -> ValueError:
    """A refusal naming the format, the layer, what is wrong and what would work."""
    return ValueError(f"format {fmt!r} cannot hold layer {name}: {problem}; {fix}")


def require_quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """:func:`quant_layers`, refusing a model that has none."""
    layers = quant_layers(model)
    if not layers:
        raise ValueError("the model has no quantized layers: quantize it first, or save it with format='native'")
    return layers


def refuse_w8a8(fmt: str, name: str, m: nn.Module) -> None:
    """Weight-only formats cannot hold a W8A8 layer."""
    if isinstance(m, QuantLinearW8A8):
        raise layer_bits_error(fmt, name, f"it is a W8A8 layer (int8 activations), {fmt.upper()} is weight-only",
                               "use format='compressed-tensors' (int-quantized) or 'native'")


def refuse_ragged_groups(fmt: str, name: str, m: QuantLinear, why: str, fix: str = "use format='native'") -> None:
    """Formats whose groups must divide K refuse a ragged last group (``why``: the format's reason)."""
    k = m.in_features
    if m.group_size != -1 and k % m.group_size:
        hint = ", ".join(f"group_size={g}" for g in (32, 64, 128, -1) if g == -1 or k % g == 0)
        raise layer_bits_error(fmt, name, f"in_features={k} is not a multiple of group_size={m.group_size} ({why})",
                               f"quantize with {hint}, or {fix}")


def refuse_grouped_act_order(fmt: str, name: str, m: QuantLinear, why: str) -> None:
    """Formats without ``g_idx`` cannot hold act-order over several groups."""
    if m.perm is not None and m.group_len < m.in_features:
        raise layer_bits_error(fmt, name, f"it was quantized with act-order (grouped columns permuted) and {why}",
                               "use format='gptq' (desc_act) or 'native', or quantize without act_order")


# ---------------------------------------------------------------- what the formats share on load
def has_quant_method(path: Path, method: str) -> bool:
    """``config.json``'s ``quantization_config.quant_method`` is ``method`` (case-insensitive)."""
    qc = quantization_config(path)
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == method


def start_load(path: Path, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], nn.Module, torch.dtype]:
    """The checkpoint's tensors, an empty full-precision model and the dtype it was built in."""
    state = load_tensors(path)
    model = empty_model(path, dtype, state)
    prepare_model(model)  # the plain-linear form the checkpoint was written from (experts one by one, no Conv1D)
    arch = architecture(model)
    state = {hub_name(k, arch, reverse=True): v for k, v in state.items()}
    return state, model, next(p.dtype for p in model.parameters() if p.is_floating_point())


def take_layer(state: dict[str, torch.Tensor], name: str, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Pop layer ``name``'s tensors named ``keys`` (those present) out of ``state``, prefix removed."""
    return {key: state.pop(f"{name}.{key}") for key in keys if f"{name}.{key}" in state}


def load_packed(path: Path, device: str | torch.device, dtype: torch.dtype | None, keys: tuple[str, ...],
                required: tuple[str, ...], build: Callable[[dict[str, torch.Tensor], str, torch.dtype], nn.Module],
                source_format: dict[str, Any]) -> nn.Module:
    """GPTQ / AWQ: every ``name.qweight`` with the ``keys`` beside it (``required`` among them) becomes the layer
    ``build(tensors, name, dtype)``; ``source_format`` goes into ``ptqkit_info``."""
    state, model, dtype = start_load(path, dtype)
    for name in [k[: -len(".qweight")] for k in state if k.endswith(".qweight")]:
        own = take_layer(state, name, keys)
        if not all(k in own for k in required):
            raise ValueError(f"{path}: layer {name} has a qweight but no {'/'.join(required)}")
        put_layer(model, name, build(own, name, dtype), path)
    return finish_foreign(model, state, path, device, source_format)


def finish_foreign(model: nn.Module, state: dict[str, torch.Tensor], path: Path, device: str | torch.device,
                   source_format: dict[str, Any]) -> nn.Module:
    """:func:`finish_load` for a checkpoint of another format (``source_format``: what it was)."""
    info = read_info(path) or {"method": source_format["format"]}
    return finish_load(model, state, path, device, {**info, "source_format": source_format})


def put_layer(model: nn.Module, name: str, layer: nn.Module, path: Path) -> None:
    """Replace linear ``name`` of ``model`` by ``layer`` after checking that their shapes agree."""
    lin = model.get_submodule(name)
    if (layer.in_features, layer.out_features) != (lin.in_features, lin.out_features):
        raise ValueError(f"{path}: layer {name} holds a {layer.in_features}x{layer.out_features} weight, "
                         f"the model config expects {lin.in_features}x{lin.out_features}")
    model.set_submodule(name, layer)
