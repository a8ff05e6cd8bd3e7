"""AWQ GEMM checkpoints (AutoAWQ ``version: gemm``, as transformers and vLLM read them).

Per quantized linear ``name`` (K inputs, N outputs, G = K / group_size groups), 4-bit only:

- ``name.qweight`` int32 ``[K, N/8]``: codes of output columns ``8j .. 8j+7`` in word ``j``,
  interleaved: nibble ``i`` (bits ``4i .. 4i+3``) holds column ``8j + AWQ_ORDER[i]`` with
  ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`` (the order AWQ's GEMM kernel dequantizes in);
- ``name.qzeros`` int32 ``[G, N/8]``: zero points, packed the same way (no offset);
- ``name.scales`` ``[G, N]``; optional ``name.bias``;
- ``w[n, k] = (code[k, n] − zero[k // group_size, n]) · scale[k // group_size, n]``;
- ``quantization_config``: ``quant_method: awq``, ``bits: 4``, ``group_size``, ``zero_point``,
  ``version: gemm``.

AWQ has no ``g_idx``: act-order layers with several groups cannot be stored.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..layers import QuantLinear
from ..packing import pack
from .common import (DEFAULT_SHARD_SIZE, checkpoint_tensors, layer_bits_error, load_packed, quantization_config,
                     refuse_grouped_act_order, refuse_ragged_groups, refuse_w8a8, require_quant_layers,
                     write_checkpoint)
from .gptq import original_order, pack_cols, skipped_block_linears, unpack_cols

log = logging.getLogger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # nibble i holds column AWQ_ORDER[i] of each 8-column block
BITS = 4
PACK = 32 // BITS
AWQ_REVERSE = tuple(AWQ_ORDER.index(c) for c in range(PACK))   # column c is in nibble AWQ_REVERSE[c]


# ---------------------------------------------------------------- pure conversions
def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[R, N]`` -> int32 ``[R, N/8]`` in AWQ's interleaved order."""
    v = values.reshape(values.shape[0], -1, PACK)[:, :, AWQ_ORDER]       # nibble i <- column AWQ_ORDER[i]
    return pack_cols(v.reshape(values.shape), BITS)


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`awq_pack`: int32 ``[R, W]`` -> uint8 ``[R, 8W]``."""
    r, w = packed.shape
    return unpack_cols(packed, BITS, w * PACK).reshape(r, w, PACK)[:, :, AWQ_REVERSE].reshape(r, w * PACK)


def to_awq(layer: QuantLinear) -> dict[str, torch.Tensor]:
    """A 4-bit QuantLinear (no act-order, or a single group) as AWQ GEMM tensors."""
    codes = original_order(layer)[0].t()                                # [K, N], act-order (one group) undone
    return {"qweight": awq_pack(codes), "qzeros": awq_pack(layer.zeros), "scales": layer.scales}


def from_awq(t: dict[str, torch.Tensor], group_size: int, name: str, dtype: torch.dtype) -> QuantLinear:
    """A QuantLinear from one layer's AWQ GEMM tensors (keys without the layer prefix)."""
    codes = awq_unpack(t["qweight"])                             # [K, N]
    k, n = codes.shape
    group_len = k if group_size == -1 else group_size
    g = t["scales"].shape[0]
    if k % group_len or g != k // group_len or t["scales"].shape[1] != n:
        raise ValueError(f"{name}: scales {tuple(t['scales'].shape)} do not fit K={k}, N={n}, group_size={group_size}")
    if "qzeros" in t:
        zeros = awq_unpack(t["qzeros"])                          # [G, N]
    else:                                                        # zero_point: false -> symmetric around 8
        zeros = torch.full((g, n), 2 ** (BITS - 1), dtype=torch.uint8)
    return QuantLinear.from_packed(pack(codes, BITS), t["scales"], zeros, BITS, group_size, k, bias=t.get("bias"),
                                   dtype=dtype)


# ---------------------------------------------------------------- save
def check_layer(name: str, m: nn.Module, group_size: int) -> None:
    """Refuse (naming the layer and what would work) what an AWQ GEMM checkpoint cannot hold."""
    refuse_w8a8("awq", name, m)
    if m.bits != BITS:
        raise layer_bits_error("awq", name, f"{m.bits}-bit weights (AWQ GEMM holds 4-bit only)",
                               "quantize with bits=4, or use format='gptq' or 'compressed-tensors'")
    if m.group_size != group_size:
        raise layer_bits_error("awq", name, f"group_size={m.group_size} differs from the first layer's "
                               f"{group_size} (one group size per checkpoint)", "use format='compressed-tensors'")
    refuse_ragged_groups("awq", name, m, "ragged last group")
    if m.out_features % PACK:
        raise layer_bits_error("awq", name, f"out_features={m.out_features} is not a multiple of 8 (AWQ packs 8 "
                               "columns a word)", "use format='gptq' or 'native'")
    refuse_grouped_act_order("awq", name, m, "AWQ has no g_idx")


def save_awq(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, report: Any = None,
             dtype: torch.dtype | None = None, max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> Path:
    """Write ``model`` as an AWQ GEMM checkpoint. ``dtype`` (e.g. ``torch.float16``, AWQ's usual)
    casts scales and float weights; the default keeps the model's dtype (exact round trip)."""
    layers = require_quant_layers(model)
    group_size = getattr(next(iter(layers.values())), "group_size", -1)
    for name, m in layers.items():
        check_layer(name, m, group_size)
    tensors = checkpoint_tensors(model, layers, lambda name, m: to_awq(m))
    qcfg = {"quant_method": "awq", "bits": BITS, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": skipped_block_linears(model) or None}
    out = write_checkpoint(path, model, tensors, "awq", tokenizer, report, max_shard_size, qcfg, dtype)
    log.info("saved %d AWQ GEMM layers (4-bit, group %d) to %s", len(layers), group_size, out)
    return out


# ---------------------------------------------------------------- load
def load_awq(path: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> nn.Module:
    """A ptqkit model from an AWQ GEMM checkpoint (transformers' or AutoAWQ's config keys)."""
    path = Path(path)
    qc = quantization_config(path) or {}
    version = str(qc.get("version", "gemm")).lower()
    bits = int(qc.get("bits", qc.get("w_bit", BITS)))
    group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if version != "gemm" or bits != BITS:
        raise ValueError(f"{path}: AWQ version={version!r}, bits={bits}: ptqkit reads version 'gemm' with 4 bits")
    return load_packed(path, device, dtype, ("qweight", "qzeros", "scales", "bias"), ("scales",),
                       lambda t, name, dt: from_awq(t, group_size, name, dt),
                       {"format": "awq", "version": version, "bits": bits, "group_size": group_size})
