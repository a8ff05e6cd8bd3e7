"""compressed-tensors checkpoints (llm-compressor's format, read by vLLM and by transformers with
``compressed-tensors`` installed), written and read through the ``compressed_tensors`` library:
its ``QuantizationScheme`` / ``QuantizationConfig`` describe the layers, its compressors pack them
and ``ModelCompressor.update_config`` writes ``config.json``'s ``quantization_config``.

- weight-only layers -> ``pack-quantized``: ``weight_packed`` int32 ``[N, ceil(K·bits/32)]``
  (signed codes + 2**(bits-1), packed along K), ``weight_scale [N, G]``, ``weight_shape``,
  ``weight_zero_point`` (signed, packed along N) when asymmetric;
- W8A8 layers -> ``int-quantized``: ``weight`` int8 ``[N, K]``, ``weight_scale [N, 1]``, and for
  static activations ``input_scale [1]``; activations int8 per token (dynamic) or per tensor.

ptqkit's unsigned codes map to compressed-tensors' signed ones by ``q = code − 2**(bits−1)`` and
``zero_point = zero − 2**(bits−1)``, so ``(q − zero_point)·scale = (code − zero)·scale``.
compressed-tensors groups need K divisible by the group size, and 0.20 has no ``g_idx``
(act-order with several groups), so such layers are refused.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architectures import architecture, hub_name, kept_modules
from ..layers import QuantLinear, QuantLinearW8A8
from ..packing import pack
from ..quant import dequantize_weight
from .common import (DEFAULT_SHARD_SIZE, checkpoint_tensors, finish_foreign, put_layer, quantization_config,
                     refuse_grouped_act_order, refuse_ragged_groups, require_quant_layers, start_load, take_layer,
                     write_checkpoint)
from .gptq import is_sym, original_order

log = logging.getLogger(__name__)

PACKED, INT = "pack-quantized", "int-quantized"


# ---------------------------------------------------------------- schemes
def layer_scheme(name: str, m: nn.Module) -> tuple[dict[str, Any], str]:
    """The compressed-tensors scheme (as a dict for ``QuantizationScheme``) and format of a layer,
    or a refusal naming the layer and what would work."""
    if isinstance(m, QuantLinearW8A8):
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token" if m.input_scale is None else "tensor",
                "dynamic": m.input_scale is None}                # per-token dynamic or per-tensor static
        return {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
                "input_activations": acts}, INT
    k, g = m.in_features, m.scales.shape[0]
    weights: dict[str, Any] = {"num_bits": m.bits, "type": "int", "symmetric": is_sym(m)}
    if g == 1 and (m.group_size == -1 or k % m.group_size):   # one group per row: per channel
        weights["strategy"] = "channel"
    else:
        refuse_ragged_groups("compressed-tensors", name, m, "compressed-tensors groups must divide K")
        refuse_grouped_act_order("compressed-tensors", name, m, "compressed-tensors 0.20 has no g_idx")
        weights.update(strategy="group", group_size=m.group_len)
    return {"weights": weights}, PACKED


def compress_layer(m: nn.Module, scheme: Any, fmt: str) -> dict[str, torch.Tensor]:
    """One layer's tensors in ``fmt``, packed by the compressed-tensors compressor for that format
    from the exact dequantized weight (the compressor re-derives the integer codes from it)."""
    from compressed_tensors.compressors import BaseCompressor

    if isinstance(m, QuantLinearW8A8):
        scale = m.weight_scale[:, None].float()                  # [N, 1]
        state = {"weight": m.qweight.float() * scale, "weight_scale": scale}
        if m.input_scale is not None:
            state["input_scale"] = m.input_scale.reshape(1).float()
    else:
        codes, _ = original_order(m)                             # [N, K] original column order
        scales = m.scales.t().float()                            # [N, G]
        zeros = m.zeros.t().to(torch.int16)                      # [N, G]
        state = {"weight": dequantize_weight(codes, scales, zeros, m.group_len),  # [N, K] fp32, exact
                 "weight_scale": scales, "weight_zero_point": (zeros - 2 ** (m.bits - 1)).to(torch.int8)}
    out = BaseCompressor.get_value_from_registry(fmt).compress(state, scheme)
    if isinstance(m, QuantLinear):                               # scales back to the layer's dtype (exact)
        out = {k: v.to(m.scales.dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def save_compressed_tensors(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, report: Any = None,
                            dtype: torch.dtype | None = None,
                            max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> Path:
    """Write ``model`` as a compressed-tensors checkpoint: ``pack-quantized`` for weight-only
    layers, ``int-quantized`` for W8A8 ones (``mixed-precision`` when both occur)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    layers = require_quant_layers(model)
    groups: dict[str, tuple[dict[str, Any], str, list[str]]] = {}
    for name, m in layers.items():
        spec, fmt = layer_scheme(name, m)
        key = json.dumps([spec, fmt], sort_keys=True)
        groups.setdefault(key, (spec, fmt, []))[2].append(name)
    arch = architecture(model)  # names as the family's hub checkpoints write them
    fp_linears = [hub_name(n, arch) for n in dict.fromkeys(
        [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] + kept_modules(model))]
    single = len(groups) == 1
    schemes, layer_schemes = {}, {}
    for i, (spec, fmt, names) in enumerate(groups.values()):
        scheme = QuantizationScheme(targets=["Linear"] if single else [hub_name(n, arch) for n in names], format=fmt,
                                    **spec)
        schemes[f"group_{i}"] = scheme
        layer_schemes.update({name: (scheme, fmt) for name in names})
    tensors = checkpoint_tensors(model, {n: layers[n] for n in layer_schemes},  # group by group
                                 lambda name, m: compress_layer(m, *layer_schemes[name]))
    formats = {fmt for _, fmt, _ in groups.values()}
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    qconfig = QuantizationConfig(config_groups=schemes, format=fmt, quantization_status="compressed",
                                 ignore=fp_linears)  # every full-precision linear: vLLM refuses one it cannot place
    out = write_checkpoint(path, model, tensors, "compressed-tensors", tokenizer, report, max_shard_size, dtype=dtype,
                           extra=lambda tmp: ModelCompressor(quantization_config=qconfig).update_config(str(tmp)))
    log.info("saved %d layers as compressed-tensors (%s) to %s", len(layers), qconfig.format, out)
    return out


# ---------------------------------------------------------------- load
def signed_codes(t: dict[str, torch.Tensor], scheme: Any, fmt: str,
                 name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Signed integer codes ``[N, K]`` (int8) and the signed zero points ``[N, G]`` of one layer."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import quantize

    w = scheme.weights
    scale = t["weight_scale"]
    zp = t.get("weight_zero_point")
    if fmt == PACKED:
        shape = torch.Size(t["weight_shape"].tolist())
        q = unpack_from_int32(t["weight_packed"], w.num_bits, shape)
        if zp is not None and not w.symmetric and zp.dtype == torch.int32:
            zp = unpack_from_int32(zp, w.num_bits, torch.Size((shape[0], scale.shape[-1])), packed_dim=0)
    elif fmt in (INT, "naive-quantized"):
        q = t["weight"]
    elif fmt == "dense":                     # fake-quantized float weights: re-derive the codes
        q = quantize(t["weight"].float(), scale.float(), zp, w, dtype=torch.int8)
    else:
        raise ValueError(f"{name}: compressed-tensors format {fmt!r} is not supported by ptqkit "
                         f"(it reads {PACKED}, {INT}, naive-quantized and dense)")
    return q.to(torch.int8), (None if w.symmetric else zp)


def build_layer(t: dict[str, torch.Tensor], scheme: Any, fmt: str, name: str, dtype: torch.dtype) -> nn.Module:
    """A QuantLinear (weight-only) or QuantLinearW8A8 from one layer's compressed-tensors tensors."""
    w, a = scheme.weights, scheme.input_activations
    if w is None or w.type != "int" or w.strategy not in ("tensor", "channel", "group") or w.actorder == "group":
        raise ValueError(f"{name}: compressed-tensors weights {w} are not integer tensor/channel/group "
                         "quantization; ptqkit cannot represent them")
    q, zp = signed_codes(t, scheme, fmt, name)
    n, k = q.shape
    scale = t["weight_scale"]
    cols = -(-k // w.group_size) if w.strategy == "group" else 1
    if scale.numel() not in (1, n * cols) or (w.strategy != "tensor" and scale.numel() != n * cols):
        raise ValueError(f"layer {name}: weight_scale has shape {list(scale.shape)}, expected [{n}, {cols}] for "
                         f"{w.strategy} scales of a [{n}, {k}] weight (size mismatch): the checkpoint is damaged")
    scale = scale.reshape(n, -1) if scale.numel() > 1 else scale.reshape(1, 1).expand(n, 1)   # tensor -> channel
    offset = 2 ** (w.num_bits - 1)
    if a is not None:
        ok = (a.type == "int" and a.num_bits == 8 and a.symmetric and w.num_bits == 8 and w.symmetric
              and w.strategy in ("tensor", "channel")
              and ((a.strategy == "token" and a.dynamic) or (a.strategy == "tensor" and not a.dynamic)))
        if not ok:
            raise ValueError(f"{name}: activation scheme {a} with weights {w} is not W8A8 (int8 symmetric "
                             "per-channel weights, int8 per-token dynamic or per-tensor static activations)")
        layer = QuantLinearW8A8(k, n, bias="bias" in t, static=not a.dynamic, dtype=dtype)
        layer.qweight.copy_(q)
        layer.weight_scale.copy_(scale[:, 0].float())
        if not a.dynamic:
            layer.input_scale.fill_(float(t["input_scale"].reshape(-1)[0]))
        if "bias" in t:
            layer.bias.copy_(t["bias"])
        return layer
    group_size = w.group_size if w.strategy == "group" else -1
    zeros = (torch.full_like(scale, offset, dtype=torch.int16) if zp is None
             else zp.reshape(n, -1).to(torch.int16) + offset)
    codes = (q.to(torch.int16) + offset).t()                                # [K, N] unsigned
    return QuantLinear.from_packed(pack(codes, w.num_bits), scale.t(), zeros.t(), w.num_bits, group_size, k,
                                   bias=t.get("bias"), dtype=dtype)


def load_compressed_tensors(path: str | os.PathLike, device: str | torch.device = "cpu",
                            dtype: torch.dtype | None = None) -> nn.Module:
    """A ptqkit model from a compressed-tensors checkpoint (ptqkit's own or llm-compressor's)."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_named_modules

    path = Path(path)
    qc = quantization_config(path) or {}
    qconfig = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k in QuantizationConfig.model_fields})
    state, model, dtype = start_load(path, dtype)
    keys = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "input_scale", "bias")
    arch = architecture(model)
    ignore = [hub_name(n, arch, reverse=True) for n in qconfig.ignore or []]
    for scheme in qconfig.config_groups.values():
        fmt = scheme.format or qconfig.format
        targets = [hub_name(t, arch, reverse=True) for t in scheme.targets]
        for name, lin in list(match_named_modules(model, targets, ignore)):
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"{path}: {name} ({type(lin).__name__}) is quantized; ptqkit handles nn.Linear only")
            put_layer(model, name, build_layer(take_layer(state, name, keys), scheme, fmt, name, dtype), path)
    return finish_foreign(model, state, path, device, {"format": "compressed-tensors", "compression": qconfig.format})
