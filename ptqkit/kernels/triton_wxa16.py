"""Triton weight-only GEMM, W{2,3,4,8}A16 (fp16 / bf16 activations; fp32 too, for tests).

Layout as in :mod:`ptqkit.kernels.reference`: ``qweight`` int32 ``[ceil(K*bits/32), N]`` (codes
packed along K as a little-endian bitstream), ``scales [G, N]``, ``zeros`` uint8 ``[G, N]``, stored
row ``j`` in group ``j // group_len``, optional act-order ``perm`` (``y = x[..., perm] @ W``).

Paths, by the number of rows ``M`` of ``x`` flattened to 2-D:

- ``gemv`` (M = 1): each program owns ``BLOCK_N`` columns and one K-split; it unpacks
  ``32/bits`` codes per word with shifts and accumulates ``x * w`` in an fp32 register tile
  ``[BLOCK_K / codes-per-word, BLOCK_N]``, reduced across threads once at the end;
- ``gemm`` (small M): the same unpacking feeding ``tl.dot`` (fp32 accumulator), with split-K;
- ``dequant`` (large M, or group lengths no K-tile divides): a Triton kernel writes the fp16/bf16
  weight, then ``torch.matmul`` (cuBLAS).

Split-K programs write fp32 partials ``[S, M, N]`` that a small kernel sums (deterministic),
adding the bias and casting. K-tiles never straddle a group (``group_len % BLOCK_K == 0`` or a
single group), so each K step loads one scale row and one zero row. Act-order permutes the
activation columns once (``index_select``) instead of gathering scales inside the loop. Codes
become floats by the exponent trick (no int-to-float conversion instructions).

Numerics: ``gemm`` and ``dequant`` round the dequantized weight to the scales' dtype, then to the
activation dtype, exactly as the reference does, so only the summation order differs. ``gemv``
keeps ``(code - zero) * scale`` in fp32 (cheaper: no rounding conversions, and the scale is
applied once per word) and so differs from the reference by at most half an ulp of each fp16/bf16
weight on top of that.
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from ..quant import num_groups
from .autotune import Config, ConfigCache, check_device, interpreting, m_bucket, split_k_for

log = logging.getLogger(__name__)

FUSED_MAX_M = 256   # above this many rows only dequantize + cuBLAS is considered
GEMM_ONLY_M = 64    # up to this many rows dequantize + cuBLAS is not even tried
_TUNER = ConfigCache("wxa16")


@triton.jit
def _load_codes(q_ptr, k0, offs_n, mask_n, N, KW,
                BITS: tl.constexpr, PER: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 codes of stored rows ``[k0, k0 + BLOCK_K)`` × ``offs_n``, shaped
    ``[BLOCK_K // PER, PER, BLOCK_N]`` (row ``k0 + i*PER + j``). For 2/4/8 bits ``PER = 32 // BITS``
    codes come from each word by shifts (``k0 % PER == 0``); otherwise (``PER == 1``) each code
    is read from its 64-bit window of two words, since codes may straddle words."""
    mask_n2 = mask_n[None, :]
    if PER > 1:
        offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)                       # [BK/PER]
        words = tl.load(q_ptr + offs_w[:, None] * N + offs_n[None, :],
                        mask=(offs_w[:, None] < KW) & mask_n2, other=0)        # [BK/PER, BN]
        shifts = tl.arange(0, PER) * BITS                                       # [PER]
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    else:
        bit = (k0 + tl.arange(0, BLOCK_K)) * BITS                               # [BK] stream offset
        w_lo = bit // 32
        shift = (bit % 32).to(tl.uint32)
        lo = tl.load(q_ptr + w_lo[:, None] * N + offs_n[None, :],
                     mask=(w_lo[:, None] < KW) & mask_n2, other=0).to(tl.uint32, bitcast=True)
        hi = tl.load(q_ptr + (w_lo[:, None] + 1) * N + offs_n[None, :],
                     mask=(w_lo[:, None] + 1 < KW) & mask_n2, other=0).to(tl.uint32, bitcast=True)
        # (hi << 1) << (31 - s) == hi << (32 - s) without the undefined shift by 32 when s == 0
        both = (lo >> shift[:, None]) | ((hi << 1) << (31 - shift)[:, None])
        codes = tl.expand_dims((both & ((1 << BITS) - 1)).to(tl.int32), 1)     # [BK, 1, BN]
    return codes


@triton.jit
def _codes_minus_zeros_f32(codes, z):
    """``codes - z`` in fp32, exactly. A code ORed into the mantissa of 2**23 *is* the float
    ``2**23 + code``, so one subtraction replaces the (quarter-rate) int-to-float conversion."""
    c = (codes | 0x4B000000).to(tl.float32, bitcast=True)
    return c - (z.to(tl.float32) + 8388608.0)


@triton.jit
def _dequant_rows(codes, s_ptr, z_ptr, g, offs_n, mask_n, N, W_DTYPE: tl.constexpr,
                  HALF_MATH: tl.constexpr):
    """``(codes - zero[g]) * scale[g]`` in ``W_DTYPE``, rounded exactly as the reference rounds.

    ``HALF_MATH`` (fp16 scales and weights): all in fp16 with no conversion instruction, since
    ``0x6400 | code`` is the fp16 ``1024 + code``; ``code - zero`` is exact and the product is
    rounded once, as in the reference. Otherwise exact fp32 math and one final rounding."""
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0)
    z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0)
    if HALF_MATH:
        c = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)              # 1024 + code
        zf = (z.to(tl.int32) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)    # 1024 + zero
        w = (c - zf) * s.to(tl.float16)
    else:
        w = (_codes_minus_zeros_f32(codes, z) * s.to(tl.float32)).to(s.dtype)
    return w.to(W_DTYPE)


@triton.jit
def _store_out(acc, offs_m, offs_n, mask, pid_k, M, N, bias_ptr, out_ptr,
               PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store fp32 ``acc [BM, BN]``: as split ``pid_k``'s partial, or with bias in the output dtype."""
    if PARTIAL:
        tl.store(out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, N, K, KW, group_len, chunks_per_split,
                 BITS: tl.constexpr, PER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``out[n] = sum_k x[k] * W[k, n]`` for one row ``x``; grid ``(cdiv(N, BLOCK_N), splits)``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_kk = tl.arange(0, BLOCK_K // PER)[:, None] * PER + tl.arange(0, PER)[None, :]  # [BK/PER, PER]
    acc = tl.zeros((BLOCK_K // PER, BLOCK_N), dtype=tl.float32)
    c0 = pid_k * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, tl.cdiv(K, BLOCK_K))
    for c in range(c0, c1):
        k0 = c * BLOCK_K
        xv = tl.load(x_ptr + k0 + offs_kk, mask=k0 + offs_kk < K, other=0.0).to(tl.float32)
        codes = _load_codes(q_ptr, k0, offs_n, mask_n, N, KW, BITS, PER, BLOCK_K)
        g = k0 // group_len
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0)
        d = _codes_minus_zeros_f32(codes, z[None, None, :])                     # [BK/PER, PER, BN]
        # the PER codes of a word sit in one thread: summing them here is cheap and keeps the
        # accumulator at [BK/PER, BN]; the scale is applied once per word; the cross-thread
        # reduction over K happens once, after the loop
        acc += tl.sum(xv[:, :, None] * d, axis=1) * s[None, :]
    y = tl.sum(acc, axis=0)                                                     # [BN]
    zero = tl.zeros((1,), dtype=tl.int32)
    _store_out(y[None, :], zero, offs_n, mask_n[None, :], pid_k, 1, N, bias_ptr, out_ptr,
               PARTIAL, HAS_BIAS)


@triton.jit
def _gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, KW, group_len, chunks_per_split,
                 BITS: tl.constexpr, PER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HALF_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``out = x @ W`` with in-register dequantization; grid ``(cdiv(N,BN), cdiv(M,BM), splits)``."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c0 = pid_k * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, tl.cdiv(K, BLOCK_K))
    for c in range(c0, c1):
        k0 = c * BLOCK_K
        a = tl.load(x_ptr + offs_m[:, None] * K + (k0 + offs_kk)[None, :],
                    mask=mask_m[:, None] & ((k0 + offs_kk)[None, :] < K), other=0.0)  # [BM, BK]
        codes = _load_codes(q_ptr, k0, offs_n, mask_n, N, KW, BITS, PER, BLOCK_K)
        codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))                          # rows k0 + i*PER + j
        w = _dequant_rows(codes, s_ptr, z_ptr, k0 // group_len, offs_n[None, :], mask_n[None, :],
                          N, a.dtype, HALF_MATH)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    _store_out(acc, offs_m, offs_n, mask_m[:, None] & mask_n[None, :], pid_k, M, N, bias_ptr, out_ptr,
               PARTIAL, HAS_BIAS)


@triton.jit
def _splitk_reduce_kernel(p_ptr, bias_ptr, out_ptr, MN, N, splits,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``out = sum_s partial[s] (+ bias)`` over fp32 partials ``[splits, M, N]``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, w_ptr, N, K, KW, group_len,
                    BITS: tl.constexpr, PER: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    ONE_GROUP: tl.constexpr, HALF_MATH: tl.constexpr):
    """``W [K, N] = (codes - zeros) * scales``; grid ``(cdiv(K, BLOCK_K), cdiv(N, BLOCK_N))``.
    ``ONE_GROUP``: every K-tile lies in one group, so one scale row is loaded per tile."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask = (offs_k[:, None] < K) & mask_n[None, :]
    codes = tl.reshape(_load_codes(q_ptr, k0, offs_n, mask_n, N, KW, BITS, PER, BLOCK_K),
                       (BLOCK_K, BLOCK_N))
    if ONE_GROUP:
        w = _dequant_rows(codes, s_ptr, z_ptr, k0 // group_len, offs_n[None, :], mask_n[None, :],
                          N, w_ptr.dtype.element_ty, HALF_MATH)
    else:  # group lengths no tile divides: one group index per row
        g = tl.minimum(offs_k // group_len, tl.cdiv(K, group_len) - 1)[:, None]
        w = _dequant_rows(codes, s_ptr, z_ptr, g, offs_n[None, :], mask, N, w_ptr.dtype.element_ty,
                          HALF_MATH)
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w, mask=mask)


def _half_math(scale_dtype: torch.dtype, w_dtype: torch.dtype) -> bool:
    return scale_dtype == torch.float16 and w_dtype == torch.float16


def _per_word(bits: int) -> int:
    return 32 // bits if 32 % bits == 0 else 1


def _block_ks(k: int, group_len: int, bits: int, sizes: tuple[int, ...]) -> list[int]:
    """K-tile sizes whose tiles never straddle a group and start on a word boundary."""
    return [bk for bk in sizes if bk >= _per_word(bits) and (group_len >= k or group_len % bk == 0)]


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group_len: int, in_features: int, dtype: torch.dtype | None = None,
               block_k: int = 32, block_n: int = 128) -> torch.Tensor:
    """Dequantize to ``[K, N]`` (stored row order) in ``dtype`` (default: the scales' dtype)."""
    check_device(qweight)
    k, n = in_features, qweight.shape[1]
    w = torch.empty(k, n, dtype=dtype or scales.dtype, device=qweight.device)
    one_group = group_len >= k or group_len % block_k == 0
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _dequant_kernel[grid](qweight, scales, zeros, w, n, k, qweight.shape[0], group_len,
                          BITS=bits, PER=_per_word(bits), BLOCK_K=block_k, BLOCK_N=block_n,
                          ONE_GROUP=one_group, HALF_MATH=_half_math(scales.dtype, w.dtype), num_warps=4)
    return w


def run_config(cfg: Config, x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor, bits: int, group_len: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x2 [M, K] @ W + bias`` along the path and tiles of ``cfg`` (``x2`` already permuted)."""
    m, k = x2.shape
    n, kw = qweight.shape[1], qweight.shape[0]
    if cfg["path"] == "dequant":
        w = dequantize(qweight, scales, zeros, bits, group_len, k, x2.dtype,
                       cfg.get("BLOCK_K", 32), cfg.get("BLOCK_N", 128))
        return torch.addmm(bias.to(x2.dtype), x2, w) if bias is not None else x2 @ w
    bm, bn, bk = cfg.get("BLOCK_M", 1), cfg["BLOCK_N"], cfg["BLOCK_K"]
    chunks = triton.cdiv(k, bk)
    per_split = triton.cdiv(chunks, cfg["SPLIT_K"])
    splits = triton.cdiv(chunks, per_split)                                   # no empty splits
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    dst = torch.empty(splits, m, n, dtype=torch.float32, device=x2.device) if splits > 1 else out
    common = dict(BITS=bits, PER=_per_word(bits), BLOCK_N=bn, BLOCK_K=bk, PARTIAL=splits > 1,
                  HAS_BIAS=bias is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    bias_arg = bias if bias is not None else out
    if cfg["path"] == "gemv":
        _gemv_kernel[(triton.cdiv(n, bn), splits)](
            x2, qweight, scales, zeros, bias_arg, dst, n, k, kw, group_len, per_split, **common)
    else:
        precision = "ieee" if x2.dtype == torch.float32 else "tf32"
        _gemm_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm), splits)](
            x2, qweight, scales, zeros, bias_arg, dst, m, n, k, kw, group_len, per_split,
            BLOCK_M=bm, HALF_MATH=_half_math(scales.dtype, x2.dtype), DOT_PRECISION=precision, **common)
    if splits > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            dst, bias_arg, out, m * n, n, splits, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out


def _cfg(path: str, **kw: int) -> Config:
    return {"path": path, "num_warps": 4, "num_stages": 3, **kw}


def candidate_configs(m: int, n: int, k: int, group_len: int, bits: int,
                      device: torch.device) -> list[Config]:
    """Candidate paths/tiles for a problem; the first is the untimed default (small on CPU)."""
    if device.type != "cuda":  # interpreter: one small config per path
        bks = _block_ks(k, group_len, bits, (16, 32))
        if not bks:
            return [_cfg("dequant", BLOCK_K=16, BLOCK_N=32)]
        bk = bks[-1]
        if m == 1:
            return [_cfg("gemv", BLOCK_N=32, BLOCK_K=bk, SPLIT_K=2)]
        if m <= GEMM_ONLY_M:
            return [_cfg("gemm", BLOCK_M=16, BLOCK_N=32, BLOCK_K=bk, SPLIT_K=2)]
        return [_cfg("dequant", BLOCK_K=16, BLOCK_N=32)]
    dequant = _cfg("dequant", BLOCK_K=32, BLOCK_N=128)
    bks = _block_ks(k, group_len, bits, (32, 64, 128))[-2:] or _block_ks(k, group_len, bits, (16,))
    if m > FUSED_MAX_M or not bks:
        return [dequant]
    out: list[Config] = []
    if m == 1:
        for bn in (128, 64, 256):
            for bk in reversed(bks):
                split = split_k_for(triton.cdiv(n, bn), triton.cdiv(k, bk), device, waves=4.0)
                if bk // _per_word(bits) * bn > 4096:  # fp32 accumulator tile: <= 32 regs/thread
                    continue
                for s in dict.fromkeys((split, max(split // 2, 1), split * 2)):
                    out.append(_cfg("gemv", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=s, num_stages=4))
        return out
    bms = [16] if m <= 16 else [32] if m <= 32 else [64] if m <= 64 else [64, 128] if m <= 128 else [64, 128, 256]
    for bm in bms:
        for bn in (128, 64, 256):
            if bm * bn > 128 * 128:
                continue
            for bk in reversed(bks):
                warps = 8 if bm * bn >= 128 * 128 else 4
                split = split_k_for(triton.cdiv(n, bn) * triton.cdiv(m, bm), triton.cdiv(k, bk), device)
                for s in dict.fromkeys((split, 1, split * 2) if bm <= 32 else (split, 1)):
                    out.append(_cfg("gemm", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=s,
                                    num_warps=warps, num_stages=4 if bm <= 32 else 3))
    if m > GEMM_ONLY_M:
        out.append(dequant)
    return out


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
    """``y = x[..., perm] @ dequant(W) + bias`` (same contract as the reference)."""
    check_device(x)
    k = x.shape[-1]
    n = qweight.shape[1]
    if qweight.shape[0] != (k * bits + 31) // 32 or scales.shape != (num_groups(k, group_len), n):
        raise ValueError(f"qweight {tuple(qweight.shape)} / scales {tuple(scales.shape)} do not fit "
                         f"K={k}, bits={bits}, group_len={group_len}")
    x2 = x.reshape(-1, k)                                                      # [M, K]
    if perm is not None:
        x2 = x2.index_select(1, perm)                                         # act-order, once
    x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    key = (m_bucket(m), n, k, group_len, bits, x2.dtype, scales.dtype, bias is not None)
    tune_dev = torch.device("cpu") if interpreting() else x2.device          # interpreter: small tiles
    cands = candidate_configs(m, n, k, group_len, bits, tune_dev)
    cfg = _TUNER.pick(key, cands, lambda c: run_config(c, x2, qweight, scales, zeros, bits, group_len, bias),
                      tune_dev)
    y = run_config(cfg, x2, qweight, scales, zeros, bits, group_len, bias)
    return y.reshape(*x.shape[:-1], n)
