"""Triton weight-only linear, W{2,3,4,8}A16 (fp16 / bf16 activations; fp32 too, for tests).

Layout as in :mod:`ptqkit.kernels.reference`: ``qweight`` int32 ``[ceil(K*bits/32), N]`` (codes
packed along K as a little-endian bitstream), ``scales [G, N]``, ``zeros`` uint8 ``[G, N]``, stored
row ``j`` in group ``j // group_len``, optional act-order ``perm`` (``y = x[..., perm] @ W``).

Paths, by the number of rows ``M`` of ``x`` flattened to 2-D:

- ``fused`` (M up to :data:`FUSED_MAX_M`): :func:`triton_gemv.fused_kernel`, one launch per call:
  in-register dequantization feeding tensor cores, act-order gather of x and the split-K
  reduction inside the kernel, several groups per K tile. 4-bit codes with fp16/bf16 scales take
  the fast path (two codes per instruction; the weight tile is bit-identical to the reference's).
- ``dequant`` (large M, group lengths no K tile fits, fp32 activations on a GPU): a Triton kernel
  writes the weight in input-column order (act-order applied by scattering rows), then
  ``torch.matmul`` (cuBLAS).

Host path: a call is one dict lookup (:data:`_PLANS`: launch parameters and split-K workspace per
device, M class, shapes, dtypes and flags) and one launch; plans come from :mod:`autotune`'s stored
configs or a heuristic, computed once per shape (with ``PTQKIT_AUTOTUNE=1``, the first call of an
untuned shape times the candidates first and caches the winner on disk). Otherwise no timing and
no host synchronisation happen in a call, so a layer can be captured in a CUDA graph (after one
warm-up call, as usual, which builds the plan and its workspace).

Numerics: the weight is rounded to the scales' dtype, then to the activation dtype, exactly as the
reference; only the fp32 summation order differs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..quant import num_groups
from . import triton_gemv as tg
from .autotune import (Config, ConfigStore, autotune_enabled, can_time, capability, check_device,
                       interpreting, m_class, split_k_for)

FUSED_MAX_M = 64    # above this many rows only dequantize + cuBLAS is considered (the fused
                    # kernel's x gather and accumulator outgrow the registers: benchmarks/sass_count.py shows spills)
STORE = ConfigStore("wxa16")


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, perm_ptr, w_ptr, N, K, KW, group_len,
                    BITS: tl.constexpr, PER: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_PERM: tl.constexpr):
    """``W [K, N] = (codes - zeros) * scales``, stored row ``j`` written to row ``perm[j]``
    (act-order) or ``j``; any group length; grid ``(cdiv(K, BLOCK_K), cdiv(N, BLOCK_N))``."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask = (offs_k[:, None] < K) & mask_n[None, :]
    codes = tg.load_codes(q_ptr, k0, offs_n, mask_n, N, KW, BITS, PER, BLOCK_K)       # [BK, BN]
    off = (offs_k // group_len)[:, None] * N + offs_n[None, :]                     # group of each row
    s = tl.load(s_ptr + off, mask=mask, other=0.0)
    z = tl.load(z_ptr + off, mask=mask, other=0)
    w = (codes.to(s.dtype) - z.to(s.dtype)) * s
    rows = offs_k
    if HAS_PERM:
        rows = tl.load(perm_ptr + offs_k, mask=offs_k < K, other=0)
    tl.store(w_ptr + rows[:, None].to(tl.int64) * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def _per_word(bits: int) -> int:
    return 32 // bits if 32 % bits == 0 else 1


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group_len: int, in_features: int, dtype: torch.dtype | None = None,
               block_k: int = 32, block_n: int = 128, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize to ``[K, N]`` in ``dtype`` (default: the scales' dtype); stored row order, or
    input-column order when ``perm`` is given (row ``j`` goes to ``perm[j]``)."""
    check_device(qweight)
    k, n = in_features, qweight.shape[1]
    w = torch.empty(k, n, dtype=dtype or scales.dtype, device=qweight.device)
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _dequant_kernel[grid](qweight, scales, zeros, perm if perm is not None else qweight, w, n, k,
                          qweight.shape[0], group_len, BITS=bits, PER=_per_word(bits), BLOCK_K=block_k,
                          BLOCK_N=block_n, HAS_PERM=perm is not None, num_warps=4)
    return w


# --- configs ----------------------------------------------------------------------------------

def _group_const(k: int, group_len: int, block_k: int) -> int | None:
    """The kernel's GROUP constexpr (0: one group), or None when no K tile fits the groups."""
    if group_len >= k:
        return 0
    if group_len % block_k == 0 or (block_k % group_len == 0 and group_len % 8 == 0):
        return group_len
    return None


def fused_fits(cfg: Config, k: int, group_len: int, bits: int) -> bool:
    """Whether a fused config's K tile fits the groups and the packing."""
    bk = cfg["BLOCK_K"]
    return _group_const(k, group_len, bk) is not None and bk % 32 == 0 and bk >= _per_word(bits)


def _fused(bn: int, bk: int, warps: int = 4, stages: int = 3, **kw: int) -> Config:
    return {"path": "fused", "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages, **kw}


def candidate_configs(m: int, n: int, k: int, group_len: int, bits: int,
                      device: torch.device) -> list[Config]:
    """Configs worth timing for a problem; the first is the heuristic default."""
    dequant = {"path": "dequant", "BLOCK_K": 32, "BLOCK_N": 128}
    if device.type != "cuda":  # interpreter: small tiles, one per path
        cfg = _fused(16, 32, warps=1, stages=2)
        fits = m <= FUSED_MAX_M and fused_fits(cfg, k, group_len, bits)
        return [cfg] if fits else [dict(dequant, BLOCK_K=16, BLOCK_N=32)]
    if m > FUSED_MAX_M:
        return [dequant]
    # register budgets from compiling for sm_90 (benchmarks/sass_count.py; the first entry is the default):
    # 4-bit M<=8: 256x128 2.3 instructions/code, 221 regs; M<=16: 128x128 177 regs; M<=64 the x
    # gather grows with M: 128x32 (192 regs) and 64x64 stay out of local memory, 128x64 spills a
    # little; other bit widths (generic dequantization): 128x128 / 128x64 (80..233 regs)
    if bits != 4:
        tiles = [(128, 128, 3), (128, 64, 3), (256, 64, 3), (64, 128, 3)] if m <= 16 else [(128, 32, 3), (64, 64, 3)]
    elif m <= 8:
        tiles = [(256, 128, 3), (256, 128, 4), (128, 128, 3), (128, 256, 3), (256, 64, 3), (128, 128, 4)]
    elif m <= 16:
        tiles = [(128, 128, 3), (256, 128, 3), (256, 64, 3), (128, 128, 4), (128, 64, 3)]
    else:
        tiles = [(128, 32, 3), (64, 64, 3), (128, 64, 3), (128, 32, 4)]
    out = [c for c in (_fused(bn, bk, stages=st) for bn, bk, st in tiles) if fused_fits(c, k, group_len, bits)]
    return out + [dequant] if m > 16 or not out else out


def default_config(m: int, n: int, k: int, group_len: int, bits: int, device: torch.device,
                   x_dtype: torch.dtype = torch.float16, s_dtype: torch.dtype = torch.float16) -> Config:
    """The config a call uses: tuned / cached / shipped (:mod:`autotune`), else the heuristic."""
    key = _key(m, n, k, group_len, bits, x_dtype, s_dtype)
    table_key = ("wxa16", m_class(m), bits, "g<=64" if group_len <= 64 else "g>=128")
    cfg = STORE.lookup(key, device, table_key)
    if cfg is not None and (cfg["path"] == "dequant" or (m <= FUSED_MAX_M and fused_fits(cfg, k, group_len, bits))):
        return cfg
    return candidate_configs(m, n, k, group_len, bits, device)[0]


def _key(m: int, n: int, k: int, group_len: int, bits: int, x_dtype: torch.dtype, s_dtype: torch.dtype) -> tuple:
    return (m_class(m), n, k, group_len, bits, str(x_dtype), str(s_dtype))


# --- plans and launches -----------------------------------------------------------------------

@dataclass
class Plan:
    """Launch parameters of one problem, computed once."""
    cfg: Config
    grid: tuple[int, int, int] = (1, 1, 1)
    per_split: int = 1
    splits: int = 1
    consts: dict | None = None
    ws: torch.Tensor | None = None       # fp32 split-K partials [splits, M, N]
    cnt: torch.Tensor | None = None      # int32 arrival counters, one per output tile


_PLANS: dict[tuple, Plan] = {}


def _use_tma(qweight: torch.Tensor, n: int) -> bool:
    if n % 4 or qweight.stride(1) != 1 or qweight.data_ptr() % 16:
        return False
    return interpreting() or (qweight.is_cuda and capability(qweight.device.index or 0)[0] >= 9)


def plan_params(cfg: Config, m: int, n: int, k: int, group_len: int, bits: int, x_dtype: torch.dtype,
                s_dtype: torch.dtype, device: torch.device, has_bias: bool, has_perm: bool) -> Plan:
    """Grid and constexprs of ``cfg`` for a problem (``m``: the most rows the plan serves), no
    buffers; a fused config that does not fit the problem becomes the dequant path."""
    compiled_fp32 = x_dtype == torch.float32 and not interpreting()    # ieee fp32 dot: FMA, spills
    if cfg["path"] != "fused" or m > FUSED_MAX_M or compiled_fp32 or not fused_fits(cfg, k, group_len, bits):
        return Plan({"path": "dequant", "BLOCK_K": 32, "BLOCK_N": 128} if cfg["path"] == "fused" else cfg)
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    bm = max(8, triton.next_power_of_2(m))
    n_tiles, chunks = triton.cdiv(n, bn), triton.cdiv(k, bk)                   # one M tile: m <= bm
    split = cfg.get("SPLIT_K") or split_k_for(n_tiles, chunks, device)
    per_split = triton.cdiv(chunks, split)
    splits = triton.cdiv(chunks, per_split)                                    # no empty splits
    # the 4-bit fast path: fp16 or bf16 scales in the activation dtype
    fast = (bits == 4 and s_dtype == x_dtype and x_dtype in (torch.float16, torch.bfloat16)
            and (group_len >= k or group_len % 8 == 0))
    consts = dict(BITS=bits, BM=bm, BN=bn, BK=bk, GROUP=_group_const(k, group_len, bk),
                  NW=cfg["num_warps"], FAST=fast, ASM=not interpreting(), ONE_ROW=m == 1,
                  HAS_PERM=has_perm, HAS_BIAS=has_bias, SPLIT=splits > 1, STAGES=cfg["num_stages"],
                  DOT_PRECISION="ieee" if x_dtype == torch.float32 else "tf32")
    return Plan(cfg, (n_tiles, splits, 1), per_split, splits, consts)


def make_plan(cfg: Config, m: int, n: int, k: int, group_len: int, bits: int, x_dtype: torch.dtype,
              s_dtype: torch.dtype, device: torch.device, has_bias: bool, has_perm: bool) -> Plan:
    """:func:`plan_params` plus the split-K workspace (partials for up to ``m`` rows, counters)."""
    plan = plan_params(cfg, m, n, k, group_len, bits, x_dtype, s_dtype, device, has_bias, has_perm)
    if plan.splits > 1:
        plan.ws = torch.empty(plan.splits, m, n, dtype=torch.float32, device=device)
        plan.cnt = torch.zeros(plan.grid[0], dtype=torch.int32, device=device)
    return plan


def launch(plan: Plan, x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
           bits: int, group_len: int, bias: torch.Tensor | None, perm: torch.Tensor | None) -> torch.Tensor:
    """``x2 [M, K] @ W (+ bias)`` along ``plan`` (``x2`` in input-column order)."""
    m, k = x2.shape
    n = qweight.shape[1]
    cfg = plan.cfg
    if cfg["path"] == "dequant":
        w = dequantize(qweight, scales, zeros, bits, group_len, k, x2.dtype, cfg.get("BLOCK_K", 32),
                       cfg.get("BLOCK_N", 128), perm=perm)
        return torch.addmm(bias.to(x2.dtype), x2, w) if bias is not None else x2 @ w
    c = plan.consts
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    q_desc = None
    if c["FAST"] and _use_tma(qweight, n):
        from triton.tools.tensor_descriptor import TensorDescriptor
        q_desc = TensorDescriptor.from_tensor(qweight, [c["BK"] // 8, c["BN"]])
    tg.fused_kernel[plan.grid](
        x2, perm if perm is not None else x2, qweight, q_desc, scales, zeros,
        bias if bias is not None else out, out, plan.ws if plan.ws is not None else out,
        plan.cnt if plan.cnt is not None else out, m, n, k, qweight.shape[0], scales.shape[0],
        plan.per_split, plan.splits, USE_TMA=q_desc is not None, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **c)
    return out


def run_config(cfg: Config, x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor, bits: int, group_len: int, bias: torch.Tensor | None = None,
               perm: torch.Tensor | None = None) -> torch.Tensor:
    """``x2[:, perm] @ W + bias`` along ``cfg`` with a fresh plan (tests, tuning, benchmarks)."""
    m, k = x2.shape
    plan = make_plan(cfg, m, qweight.shape[1], k, group_len, bits, x2.dtype, scales.dtype, x2.device,
                     bias is not None, perm is not None)
    return launch(plan, x2.contiguous(), qweight, scales, zeros, bits, group_len, bias, perm)


def _plan(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
          group_len: int, bias: torch.Tensor | None, perm: torch.Tensor | None) -> Plan:
    """The cached plan of this problem; built once (with a measured tune if PTQKIT_AUTOTUNE=1)."""
    m, k = x2.shape
    n = qweight.shape[1]
    m_key = m if m <= 16 else m_class(m)           # plans for M > 16 cover a power-of-two bucket
    key = (x2.device, m_key, n, k, group_len, bits, x2.dtype, scales.dtype, bias is not None, perm is not None)
    plan = _PLANS.get(key)
    if plan is None:
        dev = torch.device("cpu") if interpreting() else x2.device             # interpreter: small tiles
        cfg = default_config(m, n, k, group_len, bits, dev, x2.dtype, scales.dtype)
        skey = _key(m, n, k, group_len, bits, x2.dtype, scales.dtype)
        if autotune_enabled() and can_time(x2.device) and skey not in STORE.best:
            cfg, _ = STORE.tune(skey, candidate_configs(m, n, k, group_len, bits, x2.device),
                                lambda c: run_config(c, x2, qweight, scales, zeros, bits, group_len, bias, perm),
                                x2.device)
        plan = make_plan(cfg, m_key, n, k, group_len, bits, x2.dtype, scales.dtype, x2.device,
                         bias is not None, perm is not None)
        _PLANS[key] = plan
    return plan


def wxa16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_len: int, perm: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x[..., perm] @ dequant(W) + bias`` (same contract as the reference)."""
    check_device(x)
    k, n = x.shape[-1], qweight.shape[1]
    if qweight.shape[0] != (k * bits + 31) // 32 or scales.shape != (num_groups(k, group_len), n):
        raise ValueError(f"qweight {tuple(qweight.shape)} / scales {tuple(scales.shape)} do not fit "
                         f"K={k}, bits={bits}, group_len={group_len}")
    x2 = x.reshape(-1, k).contiguous()                                           # [M, K]
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], n)
    plan = _plan(x2, qweight, scales, zeros, bits, group_len, bias, perm)
    y = launch(plan, x2, qweight, scales, zeros, bits, group_len, bias, perm)
    return y.reshape(*x.shape[:-1], n)
