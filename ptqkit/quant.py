"""Uniform integer quantization math: quantization parameters, fake-quant, grouping.

Conventions (shared by every algorithm, layer, kernel and checkpoint format):
- codes are unsigned integers in ``[0, 2**bits - 1]``; ``w ≈ (code - zero) * scale``;
- symmetric: ``scale = 2·max|w| / (2**bits - 1)``, ``zero = 2**(bits-1)`` (GPTQ's convention);
- asymmetric: the range ``[min(w, 0), max(w, 0)]`` is split into ``2**bits - 1`` steps,
  ``zero = round(-min / scale)`` (0 is always exactly representable);
- groups run along the input dimension; the last group may be shorter (ragged).
"""
from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass


#: every algorithm config is a pydantic dataclass with these settings: types are checked strictly (a bool is a
#: bool, not the string "false"), and a field no config has is an error
STRICT = ConfigDict(strict=True, extra="forbid")


@dataclass(config=STRICT)
class QuantArgs:
    """Weight quantization arguments shared by all quantizers."""

    bits: Annotated[int, Field(ge=2, le=8)] = 4
    group_size: int = 128  # -1: one group per output channel
    sym: bool = True
    mse: bool = False  # search a clipping ratio per group minimising the |w - q|^norm error
    mse_grid: Annotated[int, Field(ge=1)] = 100
    mse_maxshrink: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.8
    mse_norm: Annotated[float, Field(gt=0.0)] = 2.4

    def __post_init__(self) -> None:
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} is not valid: use -1 (per output channel) "
                             "or a positive group length such as 32, 64 or 128")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_len(self, in_features: int) -> int:
        """Effective group length for a layer with ``in_features`` inputs."""
        return in_features if self.group_size == -1 else min(self.group_size, in_features)


def num_groups(in_features: int, group_len: int) -> int:
    return math.ceil(in_features / group_len)


def qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from a value range (any shape); ``xmin <= 0 <= xmax`` is enforced."""
    maxq = 2**bits - 1
    xmin = xmin.clamp(max=0)
    xmax = xmax.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    degenerate = (xmax - xmin) == 0
    xmin = torch.where(degenerate, -torch.ones_like(xmin), xmin)
    xmax = torch.where(degenerate, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as floats) of ``w`` under broadcastable ``scale``/``zero``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Quantize then dequantize: ``(q - zero) * scale``."""
    return (quantize_codes(w, scale, zero, maxq) - zero) * scale


def find_qparams(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero ``[R]`` for ``w [R, C]``, with optional MSE clip search.

    The clip search shrinks the range by ``p`` over a grid and keeps, per row, the ``p``
    with the smallest ``sum |fake_quant(w) - w|^norm`` (as in GPTQ's reference code).
    """
    wf = w.float()
    xmin, xmax = wf.min(dim=1).values, wf.max(dim=1).values
    scale, zero = qparams_from_range(xmin, xmax, args.bits, args.sym)
    if not args.mse:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(int(args.mse_maxshrink * args.mse_grid)):
        p = 1 - i / args.mse_grid
        s, z = qparams_from_range(p * xmin, p * xmax, args.bits, args.sym)
        err = (fake_quant(wf, s[:, None], z[:, None], args.maxq) - wf).abs_().pow_(args.mse_norm).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def grouped(w: torch.Tensor, group_len: int) -> torch.Tensor:
    """``[..., N, K]`` -> ``[..., N, G, g]``, zero-padding a ragged last group (zeros are exact)."""
    pad = -w.shape[-1] % group_len                                 # ceil(K / g) * g - K
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(*w.shape[:-1], w.shape[-1] // group_len, group_len)  # [..., N, G*g] -> [..., N, G, g]


def ungrouped(wg: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`grouped`: ``[..., N, G, g]`` -> ``[..., N, K]`` (padding dropped)."""
    return wg.flatten(-2)[..., :k]


def group_view(w: torch.Tensor, group_len: int) -> torch.Tensor:
    """``[N, K]`` -> ``[N * G, g]``, zero-padding a ragged last group (zeros are exact, so harmless)."""
    return grouped(w, group_len).flatten(0, -2)  # [N, G, g] -> [N*G, g]


def quantize_weight(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of ``w [N, K]`` group-wise along K.

    Returns ``codes [N, K]`` (uint8), ``scales [N, G]`` (float32) and ``zeros [N, G]`` (uint8).
    """
    _, k = w.shape
    g = args.group_len(k)
    wg = grouped(w.float(), g)                                     # [N, G, g]
    scale, zero = (t.reshape(wg.shape[:2]) for t in find_qparams(wg.flatten(0, 1), args))  # [N*G] -> [N, G]
    codes = ungrouped(quantize_codes(wg, scale[..., None], zero[..., None], args.maxq), k)  # drop the padding
    return codes.to(torch.uint8), scale, zero.to(torch.uint8)


def dequantize_weight(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_len: int
) -> torch.Tensor:
    """``codes [N, K]``, ``scales/zeros [N, G]`` -> float weight ``[N, K]`` (dtype of ``scales``)."""
    k = codes.shape[1]
    gidx = torch.arange(k, device=codes.device) // group_len      # [K] group of each column
    s = scales[:, gidx]
    return (codes.to(s.dtype) - zeros[:, gidx].to(s.dtype)) * s
