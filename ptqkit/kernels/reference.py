"""Pure-torch reference kernels: correct everywhere (CPU included), the yardstick for Triton.

Weight-only layout (see ``ptqkit.layers.QuantLinear``): ``qweight`` int32 ``[ceil(K*bits/32), N]``
packed along K (``ptqkit.packing``), ``scales [G, N]``, ``zeros`` uint8 ``[G, N]``; stored row ``j``
belongs to group ``j // group_len``; with act-order, stored row ``j`` is input column ``perm[j]``.
"""
from __future__ import annotations

import torch

from ..packing import unpack


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_len: int,
               in_features: int) -> torch.Tensor:
    """Unpack and dequantize to ``[K, N]`` in the dtype of ``scales`` (stored row order)."""
    codes = unpack(qweight, bits, in_features)                     # [K, N] uint8
    gidx = torch.arange(in_features, device=qweight.device) // group_len
    s = scales[gidx]                                               # [K, N]
    return (codes.to(s.dtype) - zeros[gidx].to(s.dtype)) * s


def linear_dequantized(x: torch.Tensor, w: torch.Tensor, perm: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x[..., perm] @ w + bias`` with an already dequantized ``w [K, N]`` (stored row order)."""
    if perm is not None:
        x = x.index_select(-1, perm.long())
    y = x @ w.to(x.dtype)
    return y + bias.to(y.dtype) if bias is not None else y


def wxa16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_len: int, perm: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x[..., perm] @ dequant(W) + bias`` for a weight-only quantized layer."""
    w = dequantize(qweight, scales, zeros, bits, group_len, x.shape[-1])  # [K, N]
    return linear_dequantized(x, w, perm, bias)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 quantization per row: ``x [M, K]`` -> ``(int8 [M, K], fp32 scale [M, 1])``."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-8)
    return torch.round(xf / scale).clamp(-127, 127).to(torch.int8), scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static int8 quantization with a calibrated per-tensor ``scale`` (fp32 scalar)."""
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)


#: K columns per fp32 GEMM chunk in the exact CPU emulation: an int8 product is at most
#: 128·128 = 2**14 in magnitude, so every partial sum of a 2**10-column chunk is an integer of
#: magnitude <= 2**24, exactly representable in fp32 whatever the summation order or FMA use.
FP32_EXACT_K = 1024


def _fp32_matmul_is_ieee() -> bool:
    """False when fp32 matmuls may run in reduced precision (TF32 / bf16), which is not exact."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    return getattr(mkldnn, "fp32_precision", "none") in ("none", "ieee")


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact ``int8 [M, K] @ int8 [N, K]ᵀ -> int32 [M, N]`` (equal to an int64 reference).

    CUDA: ``torch._int_mm`` (cuBLAS int8, int32 accumulate) where its shape rules hold
    (M > 16, K and N multiples of 8), else an fp64 emulation (partial sums < 2**53: exact).
    CPU: fp32 GEMMs over K chunks of :data:`FP32_EXACT_K` summed in int32 -- exact (see the
    constant) and ~15x faster than ``torch._int_mm``, whose CPU path is a scalar loop
    (4096x576 @ 576x1536: 0.7 s against 10 s on 2 cores); fp64 if fp32 matmuls are set to TF32/bf16.
    """
    if a.dtype != torch.int8 or b_t.dtype != torch.int8:
        raise TypeError(f"int8_matmul takes int8 operands, got {a.dtype} and {b_t.dtype}")
    if a.dim() != 2 or b_t.dim() != 2 or a.shape[1] != b_t.shape[1]:
        raise ValueError(f"int8_matmul: shapes {tuple(a.shape)} @ {tuple(b_t.shape)}ᵀ do not match ([M, K] @ [N, K]ᵀ)")
    (m, k), n = a.shape, b_t.shape[0]
    if a.is_cuda and m > 16 and k % 8 == 0 and n % 8 == 0:
        return torch._int_mm(a.contiguous(), b_t.t())
    if a.is_cuda or not _fp32_matmul_is_ieee():
        return (a.double() @ b_t.double().t()).to(torch.int32)
    acc = torch.zeros(m, n, dtype=torch.int32, device=a.device)
    for k0 in range(0, k, FP32_EXACT_K):
        part = a[:, k0:k0 + FP32_EXACT_K].float() @ b_t[:, k0:k0 + FP32_EXACT_K].float().t()  # [M, N], exact integers
        acc += part.to(torch.int32)
    return acc


def _int8_matmul_fp32(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """:func:`int8_matmul` converted to fp32 for the epilogue; on a CPU with at most one
    :data:`FP32_EXACT_K` chunk that is the fp32 GEMM itself (its sums are exact integers), without
    the int32 round trip."""
    if not a.is_cuda and a.shape[-1] <= FP32_EXACT_K and _fp32_matmul_is_ieee():
        return a.float() @ b_t.float().t()
    return int8_matmul(a, b_t).float()


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8: int8 weights ``[N, K]`` with per-channel ``weight_scale [N]``; activations int8
    per-token dynamic (``input_scale=None``) or per-tensor static. int32 accumulate, fp32 epilogue."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])                                  # [M, K]
    if input_scale is None:
        xq, xs = quantize_per_token(x2)
    else:
        xq, xs = quantize_per_tensor(x2, input_scale), input_scale.float().reshape(1, 1)
    acc = _int8_matmul_fp32(xq, qweight)                           # [M, N]
    y = acc.mul_(xs).mul_(weight_scale.float()[None, :])           # in place: same products, no temporaries
    if bias is not None:
        y = y.add_(bias.float())
    return y.to(x.dtype).reshape(*shape[:-1], qweight.shape[0])
