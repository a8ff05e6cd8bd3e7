"""Triton W8A8: int8 activation quantization and an int8 ``tl.dot`` GEMM with a fused epilogue.

- :func:`quantize_per_token` / :func:`quantize_per_tensor`: symmetric int8, ``scale = absmax/127``
  (clamped at 1e-8) per row, or a static calibrated scale; ``round`` is half-to-even like
  ``torch.round`` and divisions are IEEE-rounded (``div_rn``), so codes equal the reference's
  bit for bit;
- :func:`int8_gemm`: ``int8 [M, K] @ int8 [N, K]ᵀ`` accumulated in int32 (exact), then
  ``acc * x_scale * w_scale (+ bias)`` in fp32 and one cast to the output dtype, along one of two
  paths: the Triton int8 ``tl.dot`` GEMM with the epilogue fused, or ``torch._int_mm`` (cuBLAS
  int8) followed by a one-pass Triton epilogue. Which is faster depends on the shape; the choice
  per shape comes from :mod:`autotune` (tuned on the GPU at first use when ``PTQKIT_AUTOTUNE=1``,
  cached on disk; else the shipped table, else a heuristic) and is made once per shape.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from .autotune import (Config, ConfigStore, autotune_enabled, can_time, check_device, interpreting,
                       m_class, next_pow2)

STORE = ConfigStore("w8a8")
_PATHS: dict[tuple, Config] = {}   # per problem: the config a call uses (computed once)


@triton.jit
def _round_half_even(v):
    """``torch.round`` for fp32 (exact for |v| < 2**23): floor, then fix halves and above-halves."""
    r = tl.floor(v)
    d = v - r                                                   # exact, in [0, 1)
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, in_scale_ptr, K, STATIC: tl.constexpr, BLOCK: tl.constexpr):
    """Quantize row ``program_id`` of ``x [M, K]`` to int8; writes its fp32 scale to ``s_ptr``."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * K
    offs = tl.arange(0, BLOCK)
    if STATIC:
        scale = tl.load(in_scale_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            v = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 127.0), 1e-8)
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        v = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = _round_half_even(tl.math.div_rn(v, scale))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * K + k0 + offs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, as_ptr, bs_ptr, bias_ptr, out_ptr, M, N, K,
                      PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """``out = (a @ bᵀ) * a_scale * b_scale (+ bias)``; ``a`` int8 ``[M, K]``, ``b`` int8 ``[N, K]``."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped launch order: GROUP_M row-tiles sweep the columns together, for L2 reuse of b
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m % M                                           # wrapped: loads need no row mask
    cols = offs_n % N
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * K + offs_k[None, :]    # [BM, BK]
    b_ptrs = b_ptr + cols[None, :].to(tl.int64) * K + offs_k[:, None]    # [BK, BN] view of bᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + offs_k)[None, :] < K, other=0)
            b = tl.load(b_ptrs, mask=(k0 + offs_k)[:, None] < K, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if PER_TOKEN:
        a_scale = tl.load(as_ptr + rows)[:, None]
    else:
        a_scale = tl.load(as_ptr)
    y = acc.to(tl.float32) * a_scale                           # same order as the reference
    y = y * tl.load(bs_ptr + cols).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_epilogue_kernel(acc_ptr, as_ptr, bs_ptr, bias_ptr, out_ptr, M, N, PER_TOKEN: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out = acc * a_scale * b_scale (+ bias)`` for an int32 ``acc [M, N]`` (``torch._int_mm``'s),
    in the same fp32 order as the fused GEMM; grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    off = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    acc = tl.load(acc_ptr + off, mask=mask, other=0)
    if PER_TOKEN:
        a_scale = tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    else:
        a_scale = tl.load(as_ptr)
    y = acc.to(tl.float32) * a_scale
    y = y * tl.load(bs_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=mask)


def _quantize(x: torch.Tensor, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    check_device(x)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()                              # [M, K]
    m, k = x2.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    static = input_scale is not None
    in_scale = input_scale.reshape(1).float() if static else s
    block = min(next_pow2(k), 4096 if static or not x.is_cuda else 8192)
    if m > 0:
        _quant_kernel[(m,)](x2, q, s, in_scale, k, STATIC=static, BLOCK=block,
                            num_warps=8 if block >= 4096 else 4)
    return q, s


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row: ``x [M, K]`` -> ``(int8 [M, K], fp32 scale [M, 1])``."""
    return _quantize(x, None)


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static int8 quantization with a calibrated per-tensor ``scale`` (fp32 scalar)."""
    return _quantize(x, scale)[0].reshape(x.shape)


def _cfg(bm: int, bn: int, bk: int, warps: int = 4, stages: int = 3) -> Config:
    return {"path": "triton", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
            "num_warps": warps, "num_stages": stages}


INT_MM: Config = {"path": "int_mm"}


def int_mm_ok(m: int, n: int, k: int, device: torch.device) -> bool:
    """``torch._int_mm``'s shape rules on CUDA (M > 16, K and N multiples of 8); any shape on CPU."""
    return device.type != "cuda" or (m > 16 and k % 8 == 0 and n % 8 == 0)


def candidate_configs(m: int, device: torch.device, n: int = 0, k: int = 0) -> list[Config]:
    """Configs by M (Triton tiles, plus ``torch._int_mm`` where it applies); the first is the
    heuristic default (a small tile on CPU)."""
    if device.type != "cuda":
        return [_cfg(16, 32, 32, stages=1)]
    if m <= 16:
        out = [_cfg(16, 128, 128), _cfg(16, 64, 256, stages=4), _cfg(16, 128, 256, stages=4),
               _cfg(16, 256, 128), _cfg(16, 64, 128, stages=4)]
    elif m <= 64:
        out = [_cfg(64, 128, 128), _cfg(32, 128, 128, stages=4), _cfg(64, 64, 256, stages=4),
               _cfg(32, 64, 256, stages=4), _cfg(64, 256, 128, warps=8)]
    elif m <= 256:
        out = [_cfg(128, 128, 128, warps=8), _cfg(64, 128, 128, stages=4), _cfg(128, 64, 128, stages=4),
               _cfg(64, 256, 128, warps=8), _cfg(128, 256, 128, warps=8)]
    else:
        out = [_cfg(128, 256, 128, warps=8), _cfg(128, 128, 128, warps=8, stages=4),
               _cfg(256, 128, 128, warps=8), _cfg(128, 128, 64, stages=4), _cfg(64, 128, 128, stages=4),
               _cfg(128, 256, 64, warps=8, stages=4)]
    if n and k and int_mm_ok(m, n, k, device):
        out = ([INT_MM] + out) if m >= 1024 else (out + [INT_MM])
    return out


def _run(cfg: Config, xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
         bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """Launch ``cfg`` (operands already prepared by :func:`int8_gemm`) into ``out``."""
    m, k = xq.shape
    n = qweight.shape[0]
    per_token = x_scale.numel() > 1                 # for M = 1 both readings are the same
    bias_arg = bias if bias is not None else out
    if cfg.get("path") == "int_mm":
        acc = torch._int_mm(xq, qweight.t())                                     # [M, N] int32
        grid = (triton.cdiv(m, 32), triton.cdiv(n, 128))
        _scale_epilogue_kernel[grid](acc, x_scale, weight_scale, bias_arg, out, m, n, PER_TOKEN=per_token,
                                     HAS_BIAS=bias is not None, BLOCK_M=32, BLOCK_N=128, num_warps=4)
        return
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _int8_gemm_kernel[grid](
        xq, qweight, x_scale, weight_scale, bias_arg, out, m, n, k,
        PER_TOKEN=per_token, HAS_BIAS=bias is not None, EVEN_K=k % cfg["BLOCK_K"] == 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def pick_config(m: int, n: int, k: int, out_dtype: torch.dtype, has_bias: bool, device: torch.device,
                run: Callable[[Config], object] | None = None) -> Config:
    """The config for a problem, computed once: stored (tuned / cached / shipped) or heuristic; a
    measured tune of both paths first when ``PTQKIT_AUTOTUNE=1`` and ``run`` is given."""
    key = (device if device.type == "cuda" else "cpu", m_class(m), n, k, out_dtype, has_bias)
    cfg = _PATHS.get(key)
    if cfg is not None:
        return cfg
    dev = torch.device("cpu") if interpreting() else device                     # interpreter: small tiles
    skey = (m_class(m), n, k, str(out_dtype), has_bias)
    cands = candidate_configs(m, dev, n, k)
    cfg = STORE.lookup(skey, dev, ("w8a8", m_class(m), 8, "")) or cands[0]
    if run is not None and autotune_enabled() and can_time(device):
        cfg, _ = STORE.tune(skey, cands, run, device)
    if cfg.get("path") == "int_mm" and not int_mm_ok(m, n, k, dev):  # a stored config this shape cannot take
        cfg = cands[0]
    _PATHS[key] = cfg
    return cfg


def int8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, cfg: Config | None = None) -> torch.Tensor:
    """``(xq [M, K] @ qweight [N, K]ᵀ) * x_scale * weight_scale (+ bias)`` in ``out_dtype``.

    ``x_scale`` is fp32 ``[M, 1]`` (per token) or a single element (per tensor); ``cfg`` forces a
    path / tile (``{"path": "int_mm"}`` or a Triton tile config), else :func:`pick_config`."""
    check_device(xq)
    m, k = xq.shape
    n = qweight.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    qweight = qweight.contiguous()
    x_scale = x_scale.reshape(-1).float().contiguous()
    weight_scale = weight_scale.contiguous()
    if cfg is None:
        cfg = pick_config(m, n, k, out_dtype, bias is not None, xq.device,
                          lambda c: _run(c, xq, x_scale, qweight, weight_scale, bias, out))
    _run(cfg, xq.contiguous(), x_scale, qweight, weight_scale, bias, out)
    return out


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 linear (same contract as the reference): int8 weights ``[N, K]`` with per-channel
    ``weight_scale [N]``; activations per-token dynamic or per-tensor static (``input_scale``)."""
    shape = x.shape
    xq, xs = _quantize(x, input_scale)                                        # [M, K], [M, 1]
    if input_scale is not None:
        xs = input_scale.reshape(1)
    y = int8_gemm(xq, xs, qweight, weight_scale, bias, x.dtype)
    return y.reshape(*shape[:-1], qweight.shape[0])
