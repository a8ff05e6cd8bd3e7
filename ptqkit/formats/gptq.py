"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout, as transformers and vLLM read them).

Per quantized linear ``name`` (K inputs, N outputs, G groups):

- ``name.qweight`` int32 ``[K·bits/32, N]``: codes packed along K, code ``k`` at bits
  ``[k·bits, (k+1)·bits)`` of each column's bitstream (for 3 bits, 32 codes fill 3 words and two
  codes straddle word boundaries) — the same bitstream as ``ptqkit.packing``;
- ``name.qzeros`` int32 ``[G, N·bits/32]``: zero points packed the same way along N; checkpoint
  format ``gptq`` (v1) stores ``(zero − 1) mod 2**bits`` (the historical off-by-one its kernels
  add back, so v1 cannot hold a zero point of 0),
  ``gptq_v2`` stores ``zero``;
- ``name.scales`` ``[G, N]``; ``name.g_idx`` int32 ``[K]``: the group of input column ``k``
  (``k // group_size`` unless act-order, ``desc_act``); optional ``name.bias``;
- ``w[n, k] = (code[k, n] − zero[g_idx[k], n]) · scale[g_idx[k], n]``;
- ``config.json`` ``quantization_config``: ``quant_method: gptq``, bits, group_size, desc_act, sym,
  checkpoint_format.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..layers import QuantLinear
from ..architectures import architecture, find_blocks, hub_name, kept_modules
from ..packing import pack, unpack
from .common import (DEFAULT_SHARD_SIZE, checkpoint_tensors, layer_bits_error, load_packed, quantization_config,
                     refuse_ragged_groups, refuse_w8a8, require_quant_layers, write_checkpoint)

log = logging.getLogger(__name__)

GPTQ_BITS = (2, 3, 4, 8)
VERSIONS = ("gptq", "gptq_v2")


# ---------------------------------------------------------------- pure conversions
def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[R, N]`` codes along N into int32 ``[R, N·bits/32]`` (GPTQ's ``qzeros`` layout)."""
    return pack(values.t(), bits).t().contiguous()         # [N, R] packed along N -> [R, W]


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`: int32 ``[R, W]`` -> uint8 ``[R, n]``."""
    return unpack(packed.t().contiguous(), bits, n).t()


def is_sym(layer: QuantLinear) -> bool:
    """Symmetric in GPTQ's sense: every zero point is ``2**(bits-1)``."""
    return bool((layer.zeros == 2 ** (layer.bits - 1)).all())


def original_order(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[N, K]`` and ``g_idx [K]`` in the original input-column order (act-order undone:
    stored row ``j`` is column ``perm[j]`` and belongs to group ``j // group_len``)."""
    codes = unpack(layer.qweight, layer.bits, layer.in_features)       # [K, N] stored order
    g_idx = stored_groups(layer)
    if layer.perm is not None:
        inv = layer.perm.long().argsort()                               # original column k is stored row inv[k]
        codes, g_idx = codes[inv], g_idx[inv]
    return codes.t(), g_idx


def stored_groups(layer: QuantLinear) -> torch.Tensor:
    """int32 ``[K]``: the group of each stored row (``g_idx`` without act-order)."""
    return (torch.arange(layer.in_features, device=layer.qweight.device) // layer.group_len).to(torch.int32)


def to_gptq(layer: QuantLinear, version: str = "gptq") -> dict[str, torch.Tensor]:
    """A QuantLinear as GPTQ tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``)."""
    if layer.perm is None:           # ptqkit's qweight already is GPTQ's (same bitstream along K)
        qweight, g_idx = layer.qweight, stored_groups(layer)
    else:
        codes, g_idx = original_order(layer)
        qweight = pack(codes.t(), layer.bits)                                      # [K·b/32, N]
    zeros = layer.zeros.to(torch.int64) - (1 if version == "gptq" else 0)           # [G, N]
    return {"qweight": qweight, "qzeros": pack_cols(zeros, layer.bits), "scales": layer.scales, "g_idx": g_idx}


def perm_from_g_idx(g_idx: torch.Tensor, group_len: int, name: str) -> torch.Tensor | None:
    """ptqkit's ``perm`` for a GPTQ ``g_idx``: columns sorted by group (stable), ``None`` when
    ``g_idx`` is the trivial ``k // group_len``. Refuses a ``g_idx`` whose groups are not all
    ``group_len`` long (the last may be shorter)."""
    k = g_idx.numel()
    want = torch.arange(k, device=g_idx.device) // group_len
    g = g_idx.long()
    if torch.equal(g, want):
        return None
    perm = torch.sort(g, stable=True).indices
    if not torch.equal(g[perm], want):
        counts = torch.bincount(g).tolist()
        raise ValueError(f"{name}: g_idx puts {counts} columns in its groups; ptqkit needs groups of "
                         f"{group_len} columns (g_idx must be a permutation of k // group_size)")
    return perm.to(torch.int32)


def from_gptq(t: dict[str, torch.Tensor], bits: int, group_size: int, version: str, name: str,
              dtype: torch.dtype) -> QuantLinear:
    """A QuantLinear from one layer's GPTQ tensors (keys without the layer prefix)."""
    if bits not in GPTQ_BITS:
        raise ValueError(f"{name}: GPTQ checkpoints hold {GPTQ_BITS}-bit weights, config says bits={bits}")
    words, n = t["qweight"].shape
    k = words * 32 // bits
    group_len = k if group_size == -1 else min(group_size, k)
    g = t["scales"].shape[0]
    if g != -(-k // group_len) or t["scales"].shape[1] != n:
        raise ValueError(f"{name}: scales {tuple(t['scales'].shape)} do not fit K={k}, N={n}, group_size={group_size}")
    zeros = unpack_cols(t["qzeros"], bits, n)                   # [G, N]
    if version == "gptq":
        zeros = (zeros.to(torch.int16) + 1) & (2**bits - 1)     # v1 stores (zero - 1) mod 2**bits
    perm = perm_from_g_idx(t["g_idx"], group_len, name) if "g_idx" in t else None
    qweight = t["qweight"]           # the same bitstream as ptqkit's qweight: copied as is
    if perm is not None:             # rows to stored order: grouped columns
        qweight = pack(unpack(qweight, bits, k)[perm.long()], bits)
    return QuantLinear.from_packed(qweight, t["scales"], zeros, bits, group_size, k, bias=t.get("bias"), perm=perm,
                                   dtype=dtype)


# ---------------------------------------------------------------- save
def check_layer(name: str, m: nn.Module, bits: int, group_size: int, version: str) -> None:
    """Refuse (naming the layer and what would work) what a GPTQ checkpoint cannot hold."""
    fix_fmt = "save with format='native' (holds every ptqkit layer)"
    refuse_w8a8("gptq", name, m)
    if m.bits not in GPTQ_BITS:
        raise layer_bits_error("gptq", name, f"{m.bits}-bit weights (GPTQ holds {GPTQ_BITS})",
                               f"quantize with bits in {GPTQ_BITS}, or use format='compressed-tensors' or 'native'")
    if (m.bits, m.group_size) != (bits, group_size):
        raise layer_bits_error("gptq", name, f"bits={m.bits}, group_size={m.group_size} differ from the "
                               f"first layer's bits={bits}, group_size={group_size} (one setting per checkpoint)",
                               "use format='compressed-tensors' (one scheme per layer group) or 'native'")
    refuse_ragged_groups("gptq", name, m, "ragged last group; GPTQ kernels and vLLM need K divisible by the "
                         "group size", fix_fmt)
    k, n = m.in_features, m.out_features
    if (k * m.bits) % 32 or (n * m.bits) % 32:
        raise layer_bits_error("gptq", name, f"K={k} or N={n} times {m.bits} bits is not a multiple of 32 "
                               "(qweight/qzeros are whole int32 words)", fix_fmt)
    if version == "gptq" and bool((m.zeros == 0).any()):
        raise layer_bits_error("gptq", name, f"{int((m.zeros == 0).sum())} zero points equal 0, which GPTQ v1 "
                               "cannot store (it stores zero - 1)",
                               "save with checkpoint_format='gptq_v2', quantize with sym=True, or use "
                               "format='compressed-tensors'")


def skipped_block_linears(model: nn.Module) -> list[str]:
    """Full names (the hub's) of the full-precision layers inside the decoder blocks: ignored linears, and the
    routers and 1-output gates kept by rule."""
    try:
        path, _ = find_blocks(model)
    except ValueError:
        return []
    arch = architecture(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(path + ".")]
    return [hub_name(n, arch) for n in dict.fromkeys(names + kept_modules(model))]


def gptq_config(bits: int, group_size: int, desc_act: bool, sym: bool, version: str,
                skipped: list[str], info: dict[str, Any], in_block: list[str] | None = None) -> dict[str, Any]:
    from .. import __version__

    cfg: dict[str, Any] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
        "checkpoint_format": version, "format": version, "static_groups": False, "true_sequential": True,
        "lm_head": False, "pack_dtype": "int32", "damp_percent": 0.01,
        "meta": {"quantizer": [f"ptqkit:{__version__}"], "method": info.get("method")},
    }
    if skipped:  # GPTQModel / vLLM "dynamic": a "-:" regex keeps a module in full precision
        cfg["dynamic"] = {f"-:^{n.replace('.', '[.]')}$": {} for n in skipped}
    if skipped and in_block:  # what transformers / optimum read instead (optimum/gptq/quantizer.py): the
        cfg["modules_in_block_to_quantize"] = [in_block]  # linears of a block to quantize, the same in every block
    return cfg


def save_gptq(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, report: Any = None,
              checkpoint_format: str = "gptq", dtype: torch.dtype | None = None,
              max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> Path:
    """Write ``model`` as a GPTQ checkpoint (``checkpoint_format`` ``gptq`` = v1, what vLLM and
    AutoGPTQ read; ``gptq_v2`` = GPTQModel's, which can hold a zero point of 0). ``dtype``
    (e.g. ``torch.float16``, the usual GPTQ choice) casts scales and float weights; the default
    keeps the model's dtype, which round-trips exactly."""
    if checkpoint_format not in VERSIONS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r}: use one of {VERSIONS}")
    layers = require_quant_layers(model)
    first = next(iter(layers.values()))
    bits, group_size = getattr(first, "bits", 8), getattr(first, "group_size", -1)
    for name, m in layers.items():
        check_layer(name, m, bits, group_size, checkpoint_format)
    tensors = checkpoint_tensors(model, layers, lambda name, m: to_gptq(m, checkpoint_format))
    desc_act = any(m.perm is not None and m.group_len < m.in_features for m in layers.values())
    sym = all(is_sym(m) for m in layers.values())
    names = [sorted(n for n, m in b.named_modules() if isinstance(m, QuantLinear)) for b in find_blocks(model)[1]]
    in_block = names[0] if names and all(n == names[0] for n in names) else None  # the same in every block, else None
    qcfg = gptq_config(bits, group_size, desc_act, sym, checkpoint_format, skipped_block_linears(model),
                       getattr(model, "ptqkit_info", None) or {}, in_block)
    out = write_checkpoint(path, model, tensors, "gptq", tokenizer, report, max_shard_size, qcfg, dtype)
    log.info("saved %d GPTQ layers (%d-bit, group %d, %s) to %s", len(layers), bits, group_size,
             checkpoint_format, out)
    return out


# ---------------------------------------------------------------- load
def load_gptq(path: str | os.PathLike, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> nn.Module:
    """A ptqkit model from a GPTQ checkpoint (v1 or v2; ptqkit's own or another tool's)."""
    path = Path(path)
    qc = quantization_config(path) or {}
    version = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if version not in VERSIONS:
        raise ValueError(f"{path}: GPTQ checkpoint_format {version!r} is not supported (ptqkit reads {VERSIONS}); "
                         "convert it to 'gptq' with GPTQModel first")
    bits, group_size = int(qc["bits"]), int(qc.get("group_size", -1))
    return load_packed(path, device, dtype, ("qweight", "qzeros", "scales", "g_idx", "bias"), ("qzeros", "scales"),
                       lambda t, name, dt: from_gptq(t, bits, group_size, version, name, dt),
                       {"format": "gptq", "checkpoint_format": version, "bits": bits, "group_size": group_size})
