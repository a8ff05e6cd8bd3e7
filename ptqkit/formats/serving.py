"""What each serving engine and loader reads, per checkpoint format: one table in code, each rule citing
the engine's own source (read 2026-12: vLLM 0.33, SGLang 0.5.23, transformers 5.24 + optimum 2.3 with
GPTQModel, GPTQModel 7.3, compressed-tensors 0.20; docs/serving.md for the commands).

:func:`readers` says, for a :class:`Scheme` (what a checkpoint would hold), which engines read it and why
the others do not. The dtype on disk never decides: vLLM and SGLang run an fp32 checkpoint in fp16 / bf16
(vllm/config/model.py _resolve_auto_dtype "Downcast for float32 models"). ``ptqkit.save`` refuses a
scheme no engine reads (naming an alternative that works),
warns where some do not (vLLM first), and ``format="auto"`` picks the format the most engines read.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..architectures import find_blocks
from ..layers import QuantLinear, QuantLinearW8A8
from .common import quant_layers

log = logging.getLogger(__name__)

MARLIN_GROUPS = (-1, 32, 64, 128)  # vllm/model_executor/layers/quantization/utils/marlin_utils.py


@dataclass(frozen=True)
class Scheme:
    """What a checkpoint holds, as the loaders see it."""

    bits: int
    group_size: int
    sym: bool
    act_order: bool = False                 # a stored column permutation (GPTQ g_idx / desc_act)
    w8a8: str | None = None                 # "dynamic" (per token) / "static" (per tensor) int8 activations
    dtype: torch.dtype = torch.bfloat16
    shapes: tuple[tuple[int, int], ...] = field(default=())  # (in_features, out_features) of the quantized linears
    gptq_version: str = "gptq"
    uniform_ignore: bool = True             # every block keeps the same linears in full precision


Rule = Callable[[Scheme], "str | None"]


def _divides(s: Scheme) -> str | None:
    bad = [k for k, _ in s.shapes if s.group_size != -1 and k % s.group_size]
    return f"in_features {bad[0]} is not a multiple of group_size {s.group_size}" if bad else None


def _first(*checks: str | None) -> str | None:
    return next((c for c in checks if c), None)


def _vllm_gptq(s: Scheme) -> str | None:
    return _first(
        None if (s.bits, s.sym) in ((4, True), (8, True)) else
        f"bits={s.bits}, sym={s.sym}: only 4/8-bit symmetric (auto_gptq.py TYPE_MAP)",
        None if s.group_size in MARLIN_GROUPS else f"group_size={s.group_size} (marlin_utils.py MARLIN_SUPPORTED_GROUP_SIZES)",
        "desc_act (act-order with several groups) rejected since 0.30 (gptq_utils.normalize_and_validate_gptq_desc_act)"
        if s.act_order and s.group_size != -1 else None)


def _sglang_gptq(s: Scheme) -> str | None:
    return _first(
        None if (s.bits, s.sym) in ((4, True), (8, True)) and s.group_size in MARLIN_GROUPS else
        f"bits={s.bits}, sym={s.sym}, group_size={s.group_size}: only GPTQ-Marlin (4/8-bit symmetric, groups "
        f"{MARLIN_GROUPS}) is registered on CUDA (srt/layers/quantization/gptq/gptq.py)",
        "gptq_v2 zero points are read as v1 on CUDA before 0.5.20 (gptq_kernels.py gptq_gemm has no v2 flag)"
        if s.gptq_version == "gptq_v2" and not s.sym else None)


def _hf_gptq(s: Scheme) -> str | None:
    return None if s.uniform_ignore else ("layer-by-layer full-precision exceptions: optimum reads only "
                                          "modules_in_block_to_quantize, one list for every block (optimum/gptq/quantizer.py)")


def _gptqmodel_gptq(s: Scheme) -> str | None:
    return ("an asymmetric v1 checkpoint loads only from a gptqmodel producer (models/loader.py from_quantized)"
            if not s.sym and s.gptq_version == "gptq" else None)


def _hf_awq(s: Scheme) -> str | None:
    return None if s.group_size in (-1, 16, 32, 64, 128) else f"group_size={s.group_size} (GPTQModel TorchAWQ)"


def _vllm_ct(s: Scheme) -> str | None:
    if s.w8a8:  # compressed_tensors.py _is_static_tensor_w8a8 / _is_dynamic_token_w8a8: both read
        return None
    return _first(
        None if s.bits in (4, 8) else f"bits={s.bits}: a kernel only with the optional humming package "
        "(compressed_tensors_wNa16.py; Marlin / Machete take 4 and 8)",
        "8-bit asymmetric: Machete, Hopper only (kernels/linear/mixed_precision)" if not s.sym and s.bits == 8 else None)


def _sglang_ct(s: Scheme) -> str | None:
    if s.w8a8:  # compressed_tensors/schemes/compressed_tensors_w8a8_int8.py: static and dynamic
        return None
    return _first(
        None if (s.bits, s.sym) in ((4, True), (8, True)) else f"bits={s.bits}, sym={s.sym}: WNA16 reads symmetric 4/8-bit "
        "only (srt/layers/quantization/compressed_tensors/__init__.py WNA16_SUPPORTED_TYPES_MAP)",
        None if s.group_size in MARLIN_GROUPS else f"group_size={s.group_size} (Marlin groups {MARLIN_GROUPS})")


def _hf_ct_asym(s: Scheme) -> str | None:
    return ("asymmetric: the default load fails in compressed-tensors 0.20 (pack_quantized/base.py compress() lays out "
            "meta weights without packing weight_zero_point); load with quantization_config="
            "CompressedTensorsConfig(dequantize=True)") if not s.sym and not s.w8a8 else None


def _grouped_act(s: Scheme, why: str) -> str | None:
    return f"act-order over several groups ({why})" if s.act_order and s.group_size != -1 else None


HOLDS: dict[str, Rule] = {  # what the format itself holds, whoever reads it (ptqkit's writers refuse the rest per layer)
    "compressed-tensors": lambda s: _first(_divides(s), _grouped_act(
        s, "weight_g_idx / actorder='group' was removed in compressed-tensors 0.19; vLLM refuses it since 0.30")),
    "gptq": lambda s: _first("W8A8 (weight-only format)" if s.w8a8 else None, None if s.bits in (2, 3, 4, 8) else
                             f"{s.bits}-bit weights (GPTQ holds 2/3/4/8: transformers GPTQConfig)", _divides(s)),
    "awq": lambda s: _first("W8A8 (weight-only format)" if s.w8a8 else None,
                            None if s.bits == 4 else f"{s.bits}-bit weights (AWQ GEMM holds 4: auto_awq.py TYPE_MAP)",
                            next((f"out_features {n}, not a multiple of 8 (8 columns a word)" for _, n in s.shapes if n % 8),
                                 None), _divides(s), _grouped_act(s, "AWQ has no g_idx")),
}


RULES: dict[str, dict[str, Rule]] = {
    "compressed-tensors": {"vLLM": _vllm_ct, "SGLang": _sglang_ct, "transformers": lambda s: None},
    "gptq": {"vLLM": _vllm_gptq, "SGLang": _sglang_gptq, "transformers": _hf_gptq, "GPTQModel": _gptqmodel_gptq},
    "awq": {"vLLM": lambda s: None, "transformers": _hf_awq},
}


CAVEATS: dict[str, dict[str, Rule]] = {  # engines that read the scheme only when told how (a warning, not a refusal)
    "compressed-tensors": {"transformers": _hf_ct_asym},
}


def readers(fmt: str, scheme: Scheme) -> tuple[list[str], dict[str, str]]:
    """``(engines that read scheme in fmt, {engine: why not})``; native is read by ptqkit alone."""
    if fmt not in RULES:
        return [], {}
    if cannot := HOLDS[fmt](scheme):
        return [], {e: f"the {fmt} format cannot hold {cannot}" for e in RULES[fmt]}
    why = {e: r for e, rule in RULES[fmt].items() if (r := rule(scheme))}
    return [e for e in RULES[fmt] if e not in why], why


def check(fmt: str, scheme: Scheme) -> None:
    """Refuse a scheme no engine reads in ``fmt`` (naming a format that works); warn about the engines that
    do not read it."""
    ok, why = readers(fmt, scheme)
    if fmt in RULES and not ok:
        alt = best(scheme)
        reasons = set(why.values())  # one reason when the format itself cannot hold the scheme
        told = reasons.pop() if len(reasons) == 1 else "; ".join(f"{e}: {w}" for e, w in why.items())
        raise ValueError(f"no serving engine reads this {fmt} checkpoint ({told}): save with format={alt!r}"
                         + ("" if alt != "native" else " (ptqkit reads it), or choose a grid that format holds"))
    for engine, reason in why.items():
        log.warning("%s will not load this %s checkpoint: %s", engine, fmt, reason)
    for engine, rule in CAVEATS.get(fmt, {}).items():
        if engine in ok and (note := rule(scheme)):
            log.warning("%s loads this %s checkpoint only as told: %s", engine, fmt, note)


def summary(fmt: str, scheme: Scheme | None) -> str:
    """One line for the user: who reads a checkpoint of ``scheme`` written in ``fmt``."""
    if fmt not in RULES or scheme is None:
        return "ptqkit.load reads it (no serving engine reads this layout)" if fmt == "native" else "read by transformers"
    ok, _ = readers(fmt, scheme)
    return f"read by {', '.join(ok)}" if ok else "no serving engine reads it"


def best(scheme: Scheme) -> str:
    """compressed-tensors where vLLM reads it there, else the first format (compressed-tensors, gptq, awq) that
    vLLM reads, else the first that any engine reads, else ``native`` (ptqkit alone reads it)."""
    read = {fmt: readers(fmt, scheme)[0] for fmt in RULES}
    return next((f for f in RULES if "vLLM" in read[f]), None) or next((f for f in RULES if read[f]), "native")


def scheme_of(model: nn.Module, dtype: torch.dtype | None, gptq_version: str = "gptq") -> Scheme | None:
    """The scheme of a quantized model (its first layer's grid; None without quantized layers)."""
    layers = quant_layers(model)
    if not layers:
        return None
    first = next(iter(layers.values()))
    dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    shapes = tuple({(m.in_features, m.out_features) for m in layers.values()})
    if isinstance(first, QuantLinearW8A8):
        return Scheme(8, -1, True, w8a8="static" if first.input_scale is not None else "dynamic", dtype=dtype,
                      shapes=shapes)
    q = [m for m in layers.values() if isinstance(m, QuantLinear)]
    sym = all(bool((m.zeros == 2 ** (m.bits - 1)).all()) for m in q)
    act = any(m.perm is not None and m.group_len < m.in_features for m in q)
    path, blocks = find_blocks(model)
    per_block = [{n[len(f"{path}.{i}."):] for n in layers if n.startswith(f"{path}.{i}.")} for i in range(len(blocks))]
    uniform = all(p == per_block[0] for p in per_block)
    return Scheme(first.bits, first.group_size, sym, act, None, dtype, shapes, gptq_version, uniform)


def planned(qcfg: object, shapes: dict[str, tuple[int, int]], dtype: torch.dtype) -> Scheme:
    """The scheme a quantizer config (``bits``, ``group_size``, ``sym``, ``act_order``, ...) will give linears of
    ``shapes``, before anything is quantized."""
    act = getattr(qcfg, "act_order", False) and not getattr(qcfg, "static_groups", True)
    return Scheme(qcfg.bits, qcfg.group_size, qcfg.sym, act, getattr(qcfg, "activations", None), dtype,
                  tuple(set(shapes.values())))
