"""Pure-torch reference kernels: correct everywhere (CPU included), the yardstick for Triton.

Weight-only layout (see ``ptqkit.layers.QuantLinear``): ``qweight`` int32 ``[ceil(K*bits/32), N]``
packed along K (``ptqkit.packing``), ``scales [G, N]``, ``zeros`` uint8 ``[G, N]``; stored row ``j``
belongs to group ``j // group_len``; with act-order, stored row ``j`` is input column ``perm[j]``.
"""
from __future__ import annotations

import torch

from ..packing import unpack


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_len: int,
    in_features: int,
) -> torch.Tensor:
    """Unpack and dequantize to ``[K, N]`` in the dtype of ``scales`` (stored row order)."""
    codes = unpack(qweight, bits, in_features)                     # [K, N] uint8
    gidx = torch.arange(in_features, device=qweight.device) // group_len
    s = scales[gidx]                                               # [K, N]
    return (codes.to(s.dtype) - zeros[gidx].to(s.dtype)) * s


def wxa16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_len: int,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x[..., perm] @ dequant(W) + bias`` for a weight-only quantized layer."""
    k = x.shape[-1]
    w = dequantize(qweight, scales, zeros, bits, group_len, k).to(x.dtype)  # [K, N]
    if perm is not None:
        x = x.index_select(-1, perm.long())
    y = x @ w
    return y + bias.to(y.dtype) if bias is not None else y


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 quantization per row: ``x [M, K]`` -> ``(int8 [M, K], fp32 scale [M, 1])``."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-8)
    q = torch.round(xf / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static int8 quantization with a calibrated per-tensor ``scale`` (fp32 scalar)."""
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact ``int8 [M, K] @ int8 [N, K]ᵀ -> int32 [M, N]``.

    Uses ``torch._int_mm`` where the platform has it; otherwise an fp64 emulation, which is
    exact because every partial sum stays below 2**53.
    """
    try:
        return torch._int_mm(a.contiguous(), b_t.t().contiguous())
    except (RuntimeError, AttributeError, NotImplementedError):
        return (a.double() @ b_t.double().t()).to(torch.int32)


def w8a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8: int8 weights ``[N, K]`` with per-channel ``weight_scale [N]``; activations int8
    per-token dynamic (``input_scale=None``) or per-tensor static. int32 accumulate, fp32 epilogue."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])                                  # [M, K]
    if input_scale is None:
        xq, xs = quantize_per_token(x2)
    else:
        xq, xs = quantize_per_tensor(x2, input_scale), input_scale.float().reshape(1, 1)
    acc = int8_matmul(xq, qweight)                                 # [M, N] int32
    y = acc.float() * xs * weight_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], qweight.shape[0])
