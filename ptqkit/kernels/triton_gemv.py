"""Fused small-M weight-only kernel (W{2,3,4,8}A16): dequantize in registers, tensor-core dot.

Swap-AB: ``out^T [N, M] = W^T [N, K] @ x^T [K, M]``. A program owns ``BN`` output features and a
range of K; per K step it dequantizes a ``W^T [BN, BK]`` tile in registers -- the A operand of the
dot, so it never goes through shared memory -- against ``x^T [BK, BM]`` (BM = 8 or 16 columns of
which the first M are x's rows, the rest zero), accumulating in fp32.

4-bit fast path (fp16 or bf16 scales equal to the activation dtype): two codes per instruction.
One ``lop3`` ORs codes ``j`` and ``j+4`` of a word into the mantissas of an f16x2 (``1024 + code``;
bf16x2: ``128 + code``), as Marlin and tinygemm do; subtracting ``1024 + zero`` is exact and one
``mul`` rounds ``(c - z) * s`` once, as :func:`ptqkit.kernels.reference.dequantize` does, so the
tile is bit-identical to it. A thread's registers thus hold code pairs (j, j+4): the K order of a
tile is permuted (slot ``32i + 16h + 8q + 2t + r`` holds row ``32i + 8t + 2h + q + 4r``) and x is
gathered in the same order (act-order's ``perm`` folds into that gather), which makes the tile's
register layout exactly the wgmma A layout. Output features are permuted too (:func:`feature_of_row`)
so that each thread's features are adjacent in memory (vector loads of words, scales, zeros).
Under ``TRITON_INTERPRET=1`` the inline PTX is replaced by the same pair arithmetic in plain ops.

Split-K in the same launch: each split stores fp32 partials ``[S, M, N]``; a per-tile counter
(atomic, acq_rel) elects the last split to arrive, which sums the partials in split order
(deterministic), adds the bias, writes the output and resets the counter for the next launch.
"""
from __future__ import annotations

import triton
import triton.language as tl

# f16x2: codes (j, j+4) at bits 0-3 -> 1024 + c; minus (1024 + z); times s (one rounding)
_F16_LO = tl.constexpr("""{
.reg .b32 t;
lop3.b32 t, $1, 0x000F000F, 0x64006400, 0xea;
sub.rn.f16x2 t, t, $2;
mul.rn.f16x2 $0, t, $3;
}""")
# f16x2: codes at bits 4-7 -> 1024 + 16c; times 1/16 plus -(64 + z) (exact); times s
_F16_HI = tl.constexpr("""{
.reg .b32 t, c;
mov.b32 c, 0x2C002C00;
lop3.b32 t, $1, 0x00F000F0, 0x64006400, 0xea;
fma.rn.f16x2 t, t, c, $2;
mul.rn.f16x2 $0, t, $3;
}""")
# bf16x2: codes at bits 0-3 -> 128 + c; plus -(128 + z) (fma by 1, exact); times s (fma with -0)
_BF16 = tl.constexpr("""{
.reg .b32 t, one, mz;
mov.b32 one, 0x3F803F80;
mov.b32 mz, 0x80008000;
lop3.b32 t, $1, 0x000F000F, 0x43004300, 0xea;
fma.rn.bf16x2 t, t, one, $2;
fma.rn.bf16x2 $0, t, $3, mz;
}""")
# two zero points (bytes 0, 1 of $4) -> f16x2 (1024 + z | 1024 + z) and (-(64 + z) | -(64 + z))
_Z_F16 = tl.constexpr("""{
.reg .b32 m, c;
mov.b32 m, 0x64646464;
mov.b32 c, 0x63806380;
prmt.b32 $0, $4, m, 0x4040;
prmt.b32 $1, $4, m, 0x4141;
sub.rn.f16x2 $2, c, $0;
sub.rn.f16x2 $3, c, $1;
}""")
# two zero points -> bf16x2 (-(128 + z) | -(128 + z)) (twice, to share the fp16 interface)
_Z_BF16 = tl.constexpr("""{
.reg .b32 m;
mov.b32 m, 0xC3C3C3C3;
prmt.b32 $0, $4, m, 0x4040;
prmt.b32 $1, $4, m, 0x4141;
mov.b32 $2, $0;
mov.b32 $3, $1;
}""")
# two 16-bit scales (one register) -> each duplicated into both halves
_S2 = tl.constexpr("""{
prmt.b32 $0, $2, $2, 0x1010;
prmt.b32 $1, $2, $2, 0x3232;
}""")


@tl.core.builtin
def _tma_load_evict_first(desc, offsets, _semantic=None):
    """``desc.load(offsets)`` with the evict-first L2 policy (the weights are read exactly once)."""
    return _semantic.descriptor_load(desc, offsets, tl.core._CachePolicy(eviction_policy="evict_first"))


@triton.jit
def feature_of_row(BN: tl.constexpr, NW: tl.constexpr):  # noqa: ANN201
    """Output feature (within the tile) of each A row ``i = 16*NW*R + 16*wp + 8*b + g``:
    ``(16*NR)*wp + (2*NR)*g + 2*R + b`` (NR = BN / (16*NW)), so warp ``wp``'s lane group ``g``
    owns ``2*NR`` adjacent features."""
    i = tl.arange(0, BN)
    NR: tl.constexpr = BN // (16 * NW)
    return (16 * NR) * ((i >> 4) % NW) + (2 * NR) * (i & 7) + 2 * (i // (16 * NW)) + ((i >> 3) & 1)


@triton.jit
def _rows_to_a_order(t, BN: tl.constexpr, NW: tl.constexpr):
    """Permute dim 0 (``BN`` features, natural order) of ``t [BN, C]`` to the A-row order."""
    NR: tl.constexpr = BN // (16 * NW)
    C: tl.constexpr = t.shape[1]
    t = tl.permute(tl.reshape(t, (NW, 8, NR, 2, C)), (2, 0, 3, 1, 4))
    return tl.reshape(t, (BN, C))


@triton.jit
def slot_rows(BK: tl.constexpr):  # noqa: ANN201
    """Stored K row (within the tile) of each fast-path slot: ``32i + 8t + 2h + q + 4r`` for slot
    ``32i + 16h + 8q + 2t + r``."""
    j = tl.arange(0, BK)
    return (j // 32) * 32 + ((j >> 1) & 3) * 8 + ((j >> 4) & 1) * 2 + ((j >> 3) & 1) + (j & 1) * 4


@triton.jit
def _zero_pairs(z, BF16: tl.constexpr, ASM: tl.constexpr):
    """Per zero point (uint8): the int32 f16x2/bf16x2 constants the pair ops subtract."""
    if ASM:
        if BF16:
            zz, zn = tl.inline_asm_elementwise(_Z_BF16, "=r,=r,=r,=r,r", [z], dtype=(tl.int32, tl.int32),
                                               is_pure=True, pack=2)
        else:
            zz, zn = tl.inline_asm_elementwise(_Z_F16, "=r,=r,=r,=r,r", [z], dtype=(tl.int32, tl.int32),
                                               is_pure=True, pack=2)
    else:  # same bits, plain integer ops (the interpreter runs no PTX); z itself sits in bits 0-7
        zi = z.to(tl.int32)
        if BF16:
            zz = (zi | 0xC300) | ((zi | 0xC300) << 16)
        else:
            zz = (zi | 0x6400) | ((zi | 0x6400) << 16)
        zn = zz
    return zz, zn


@triton.jit
def _scale_pairs(s, ASM: tl.constexpr):
    """Per 16-bit scale: int32 holding it in both halves."""
    if ASM:
        ss = tl.inline_asm_elementwise(_S2, "=r,=r,r", [s], dtype=tl.int32, is_pure=True, pack=2)
    else:
        b = s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        ss = b | (b << 16)
    return ss


@triton.jit
def _emulated_pair(v, zz, ss, SHIFT: tl.constexpr, W_DTYPE: tl.constexpr):
    """Interpreter version of one pair op: codes at bits SHIFT.. of each half of ``v``."""
    z = (zz & 0xFF).to(tl.float32)
    s = (ss & 0xFFFF).to(tl.int16).to(W_DTYPE, bitcast=True).to(tl.float32)
    lo = ((((v >> SHIFT) & 0xF).to(tl.float32) - z) * s).to(W_DTYPE)        # exact, then one rounding
    hi = ((((v >> (16 + SHIFT)) & 0xF).to(tl.float32) - z) * s).to(W_DTYPE)
    lo = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = hi.to(tl.int16, bitcast=True).to(tl.int32)
    return lo | (hi << 16)


@triton.jit
def _pair(v, zz, zn, ss, HI: tl.constexpr, W_DTYPE: tl.constexpr, ASM: tl.constexpr):
    """int32 packing ``((c - z) * s)`` of the two codes at bits ``4*HI`` of each half of ``v``."""
    if ASM:
        if W_DTYPE == tl.bfloat16:
            return tl.inline_asm_elementwise(_BF16, "=r,r,r,r", [v, zn, ss], dtype=tl.int32, is_pure=True, pack=1)
        elif HI:
            return tl.inline_asm_elementwise(_F16_HI, "=r,r,r,r", [v, zn, ss], dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(_F16_LO, "=r,r,r,r", [v, zz, ss], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return _emulated_pair(v, zz, ss, 4 * HI, W_DTYPE)


@triton.jit
def _halves(p, W_DTYPE: tl.constexpr):
    """``[...]`` int32 holding two 16-bit floats -> ``[..., 2]`` (low half first); free in registers."""
    lo = p.to(tl.int16).to(W_DTYPE, bitcast=True)
    hi = (p >> 16).to(tl.int16).to(W_DTYPE, bitcast=True)
    return tl.join(lo, hi)


@triton.jit
def dequant_tile_fast(words, zz, zn, ss, BN: tl.constexpr, BK: tl.constexpr, NW: tl.constexpr,  # noqa: ANN201
                      W_DTYPE: tl.constexpr, ASM: tl.constexpr):
    """4-bit ``words [BK/8, BN]`` (zz/zn/ss broadcast to that shape) -> ``W^T [BN, BK]`` in
    ``W_DTYPE``, K in slot order (:func:`slot_rows`), features in A-row order (:func:`feature_of_row`)."""
    WR: tl.constexpr = BK // 8
    if W_DTYPE == tl.bfloat16:      # bf16 has 7 mantissa bits: shift every nibble pair down
        p0 = _pair(words, zz, zn, ss, False, W_DTYPE, ASM)
        p1 = _pair(words >> 4, zz, zn, ss, False, W_DTYPE, ASM)
        p2 = _pair(words >> 8, zz, zn, ss, False, W_DTYPE, ASM)
        p3 = _pair(words >> 12, zz, zn, ss, False, W_DTYPE, ASM)
    else:
        w8 = words >> 8
        p0 = _pair(words, zz, zn, ss, False, W_DTYPE, ASM)
        p1 = _pair(words, zz, zn, ss, True, W_DTYPE, ASM)
        p2 = _pair(w8, zz, zn, ss, False, W_DTYPE, ASM)
        p3 = _pair(w8, zz, zn, ss, True, W_DTYPE, ASM)
    # pair j holds codes (j, j+4) as (low, high): [WR, BN, r, q, h] with code = 2h + q + 4r
    t = tl.join(tl.join(_halves(p0, W_DTYPE), _halves(p1, W_DTYPE)),
                tl.join(_halves(p2, W_DTYPE), _halves(p3, W_DTYPE)))
    t = tl.reshape(t, (WR // 4, 4, BN, 2, 2, 2))                  # [I, T, BN, r, q, h]
    t = tl.permute(t, (2, 0, 5, 4, 1, 3))                         # [BN, I, h, q, T, r]
    return _rows_to_a_order(tl.reshape(t, (BN, BK)), BN, NW)


@triton.jit
def load_codes(q_ptr, k0, offs_n, mask_n, N, KW, BITS: tl.constexpr, PER: tl.constexpr,  # noqa: ANN201
               BK: tl.constexpr):
    """int32 codes of stored rows ``[k0, k0 + BK)`` x ``offs_n`` as ``[BK, BN]`` (natural order).
    ``PER = 32 // BITS`` codes per word (``k0 % PER == 0``), or ``PER == 1``: each code read
    from its 64-bit window of two words (3 bits: codes straddle words)."""
    if PER > 1:
        offs_w = k0 // PER + tl.arange(0, BK // PER)                               # [BK/PER]
        words = tl.load(q_ptr + offs_w[:, None].to(tl.int64) * N + offs_n[None, :],
                        mask=(offs_w[:, None] < KW) & mask_n[None, :], other=0,
                        eviction_policy="evict_first")                            # [BK/PER, BN]
        shifts = tl.arange(0, PER) * BITS
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)   # [BK/PER, PER, BN]
    else:
        bit = (k0 + tl.arange(0, BK)) * BITS                                       # stream offset
        w_lo = bit // 32
        shift = (bit % 32).to(tl.uint32)
        row = q_ptr + w_lo[:, None].to(tl.int64) * N + offs_n[None, :]
        lo = tl.load(row, mask=(w_lo[:, None] < KW) & mask_n[None, :], other=0,
                     eviction_policy="evict_first").to(tl.uint32, bitcast=True)
        hi = tl.load(row + N, mask=(w_lo[:, None] + 1 < KW) & mask_n[None, :], other=0,
                     eviction_policy="evict_first").to(tl.uint32, bitcast=True)
        # (hi << 1) << (31 - s) == hi << (32 - s) without the undefined shift by 32 when s == 0
        both = (lo >> shift[:, None]) | ((hi << 1) << (31 - shift)[:, None])
        codes = tl.expand_dims((both & ((1 << BITS) - 1)).to(tl.int32), 1)          # [BK, 1, BN]
    return tl.reshape(codes, (BK, offs_n.shape[0]))


@triton.jit
def _scales_zeros(s_ptr, z_ptr, k0, n0, N, G, BN: tl.constexpr, GROUP: tl.constexpr,
                  GPT: tl.constexpr):
    """Scale and zero rows ``[GPT, BN]`` of the groups a K tile at ``k0`` covers (``GROUP == 0``:
    a single group); rows past the last group or features past N read as 0."""
    offs_n = n0 + tl.arange(0, BN)
    if GROUP == 0:
        g = tl.zeros((GPT,), dtype=tl.int32)
    else:
        g = k0 // GROUP + tl.arange(0, GPT)
    mask = (g < G)[:, None] & (offs_n < N)[None, :]
    off = g[:, None] * N + offs_n[None, :]
    return tl.load(s_ptr + off, mask=mask, other=0.0), tl.load(z_ptr + off, mask=mask, other=0)


@triton.jit
def _per_word(v, GPT: tl.constexpr, ROWS: tl.constexpr):
    """Broadcast per-group rows ``[GPT, BN]`` to ``[ROWS, BN]`` (tile rows in group order)."""
    BN: tl.constexpr = v.shape[1]
    return tl.reshape(tl.broadcast_to(v[:, None, :], (GPT, ROWS // GPT, BN)), (ROWS, BN))


@triton.jit
def _fast_w(q_ptr, q_desc, s, z, c, n0, N, KW, BN: tl.constexpr, BK: tl.constexpr,
            GPT: tl.constexpr, NW: tl.constexpr, W_DTYPE: tl.constexpr, ASM: tl.constexpr,
            USE_TMA: tl.constexpr):
    """Dequantized 4-bit ``W^T [BN, BK]`` of K tile ``c`` (fast-path order); ``s``, ``z``: its
    scale and zero rows ``[GPT, BN]``."""
    WR: tl.constexpr = BK // 8
    if USE_TMA:
        if ASM:   # on the GPU: with the evict-first L2 policy (the interpreter has no such builtin)
            words = _tma_load_evict_first(q_desc, [c * WR, n0])                   # [WR, BN]
        else:
            words = q_desc.load([c * WR, n0])
    else:
        offs_w = c * WR + tl.arange(0, WR)
        offs_n = n0 + tl.arange(0, BN)
        words = tl.load(q_ptr + offs_w[:, None].to(tl.int64) * N + offs_n[None, :],
                        mask=(offs_w < KW)[:, None] & (offs_n < N)[None, :], other=0,
                        eviction_policy="evict_first")
    zz, zn = _zero_pairs(z, W_DTYPE == tl.bfloat16, ASM)
    ss = _scale_pairs(s, ASM)
    zz, zn, ss = _per_word(zz, GPT, WR), _per_word(zn, GPT, WR), _per_word(ss, GPT, WR)
    return dequant_tile_fast(words, zz, zn, ss, BN, BK, NW, W_DTYPE, ASM)


@triton.jit
def _generic_w(q_ptr, s, z, c, n0, N, KW, BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               GPT: tl.constexpr, W_DTYPE: tl.constexpr):
    """Dequantized ``W^T [BN, BK]`` of K tile ``c`` (natural order), any bit width and dtypes:
    ``(code - zero) * scale`` in the scales' dtype, then cast to ``W_DTYPE`` (as the reference)."""
    offs_n = n0 + tl.arange(0, BN)
    PER: tl.constexpr = 32 // BITS if 32 % BITS == 0 else 1
    codes = load_codes(q_ptr, c * BK, offs_n, offs_n < N, N, KW, BITS, PER, BK)   # [BK, BN]
    sd: tl.constexpr = s.dtype
    w = (codes.to(sd) - _per_word(z, GPT, BK).to(sd)) * _per_word(s, GPT, BK)
    return tl.trans(w.to(W_DTYPE))


@triton.jit
def _x_cols(perm_ptr, K, k, HAS_PERM: tl.constexpr):
    """Input columns of stored rows ``k [BK]``: ``perm[k]`` with act-order, else ``k``."""
    if HAS_PERM:
        k = tl.load(perm_ptr + k, mask=k < K, other=0)
    return k


@triton.jit
def _x_load(x_ptr, offs_m, M, K, k, cols, ONE_ROW: tl.constexpr):
    """x at input columns ``cols`` of stored rows ``k [BK]``: ``[BK]`` for one row, else
    ``[BM, BK]``; rows of x past M and stored rows past K read as 0."""
    kmask = k < K
    if ONE_ROW:
        xv = tl.load(x_ptr + cols, mask=kmask, other=0.0)
    else:
        xv = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + cols[None, :],
                     mask=(offs_m < M)[:, None] & kmask[None, :], other=0.0)
    return xv


@triton.jit
def _x_tile(xv, offs_m, ONE_ROW: tl.constexpr, W_DTYPE: tl.constexpr):
    """The dot's B operand ``x^T [BK, BM]`` from :func:`_x_load`'s result."""
    if ONE_ROW:
        xv = tl.where(offs_m[:, None] == 0, xv[None, :], 0.0)                       # [BM, BK]
    return tl.trans(xv.to(W_DTYPE))


@triton.jit
def _store_out(acc, offs_n, offs_m, M, N, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr):
    """``out[m, n] = acc[n, m] (+ bias[n])`` in the output dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    tl.store(out_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue(acc, offs_n, offs_m, pid_n, pid_k, M, N, splits, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
              SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Write ``acc [BN, BM]``; with split-K, through fp32 partials reduced by the last split."""
    if SPLIT:
        mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
        row = (pid_k * M + offs_m).to(tl.int64) * N
        tl.store(ws_ptr + row[None, :] + offs_n[:, None], acc, mask=mask)
        tl.debug_barrier()                             # every thread's partial precedes the release
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == splits - 1:                      # last split of this tile: reduce in split order
            acc = tl.zeros_like(acc)
            for s in range(0, splits):
                row = (s * M + offs_m).to(tl.int64) * N
                acc += tl.load(ws_ptr + row[None, :] + offs_n[:, None], mask=mask, other=0.0,
                               cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")     # ready for the next launch
            _store_out(acc, offs_n, offs_m, M, N, bias_ptr, out_ptr, HAS_BIAS)
    else:
        _store_out(acc, offs_n, offs_m, M, N, bias_ptr, out_ptr, HAS_BIAS)


@triton.jit
def fused_kernel(x_ptr, perm_ptr, q_ptr, q_desc, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,  # noqa: ANN201
                 M, N, K, KW, G, chunks_per_split, splits,
                 BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP: tl.constexpr, NW: tl.constexpr, FAST: tl.constexpr, ASM: tl.constexpr,
                 USE_TMA: tl.constexpr, ONE_ROW: tl.constexpr, HAS_PERM: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, STAGES: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """``out [M, N] = x [M, K] @ W (+ bias)`` for ``M <= BM``; grid ``(cdiv(N, BN), splits)``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BN
    W_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    GPT: tl.constexpr = BK // GROUP if (GROUP > 0 and GROUP < BK) else 1   # groups per K tile
    offs_m = tl.arange(0, BM)
    if FAST:
        kslot = slot_rows(BK)
        feat = feature_of_row(BN, NW)
    else:
        kslot = tl.arange(0, BK)
        feat = tl.arange(0, BN)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    c0 = pid_k * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, tl.cdiv(K, BK))
    # x (a gather: too narrow for cp.async) and the scale / zero rows are prefetched one K tile
    # ahead in registers (act-order's column indices two tiles ahead, as x's loads depend on them);
    # the weights are pipelined by the compiler (TMA / cp.async, STAGES deep)
    cols = _x_cols(perm_ptr, K, c0 * BK + kslot, HAS_PERM)
    xv = _x_load(x_ptr, offs_m, M, K, c0 * BK + kslot, cols, ONE_ROW)
    cols = _x_cols(perm_ptr, K, (c0 + 1) * BK + kslot, HAS_PERM)
    s, z = _scales_zeros(s_ptr, z_ptr, c0 * BK, n0, N, G, BN, GROUP, GPT)
    for c in tl.range(c0, c1, num_stages=STAGES):
        x_cur, s_cur, z_cur = xv, s, z
        xv = _x_load(x_ptr, offs_m, M, K, (c + 1) * BK + kslot, cols, ONE_ROW)
        cols = _x_cols(perm_ptr, K, (c + 2) * BK + kslot, HAS_PERM)
        s, z = _scales_zeros(s_ptr, z_ptr, (c + 1) * BK, n0, N, G, BN, GROUP, GPT)
        if FAST:
            w = _fast_w(q_ptr, q_desc, s_cur, z_cur, c, n0, N, KW, BN, BK, GPT, NW, W_DTYPE, ASM, USE_TMA)
        else:
            w = _generic_w(q_ptr, s_cur, z_cur, c, n0, N, KW, BITS, BN, BK, GPT, W_DTYPE)
        acc = tl.dot(w, _x_tile(x_cur, offs_m, ONE_ROW, W_DTYPE), acc, input_precision=DOT_PRECISION)
    _epilogue(acc, n0 + feat, offs_m, pid_n, pid_k, M, N, splits, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
              SPLIT, HAS_BIAS)
