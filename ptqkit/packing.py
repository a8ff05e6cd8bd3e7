"""Bit-packing of integer codes into int32 words.

Codes are packed as a little-endian bitstream along dim 0: code ``i`` of a column
occupies bits ``[i*bits, (i+1)*bits)`` of the stream, word ``(i*bits) // 32``.
For 2/4/8 bits this is exactly the GPTQ ``qweight`` layout (``32/bits`` codes per
word); for 3 bits it is GPTQ's layout too (32 codes in 3 words, two codes straddle
word boundaries). Any bit width 1..8 works.
"""
from __future__ import annotations

import torch


def packed_rows(rows: int, bits: int) -> int:
    """Number of int32 words needed for ``rows`` codes of ``bits`` bits."""
    return (rows * bits + 31) // 32


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[K, N]`` (values in ``[0, 2**bits)``) into int32 ``[ceil(K*bits/32), N]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    k, n = codes.shape
    words = packed_rows(k, bits)
    c = codes.to(torch.int64) & ((1 << bits) - 1)
    out = torch.zeros(words + 1, n, dtype=torch.int64, device=codes.device)
    start = torch.arange(k, device=codes.device) * bits          # [K] bit offset of each code
    word, shift = start // 32, start % 32
    lo = c << shift[:, None]                                       # may spill past bit 31
    out.index_add_(0, word, lo & 0xFFFFFFFF)
    out.index_add_(0, word + 1, lo >> 32)                          # the spilled high part
    out = out[:words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 ``[words, N]`` -> uint8 codes ``[rows, N]``."""
    p = packed.to(torch.int64) & 0xFFFFFFFF                        # [W, N] as unsigned
    p = torch.cat([p, torch.zeros_like(p[:1])])                    # guard word for straddles
    start = torch.arange(rows, device=packed.device) * bits
    word, shift = start // 32, start % 32
    both = p[word] | (p[word + 1] << 32)                           # [rows, N] 64-bit window
    return ((both >> shift[:, None]) & ((1 << bits) - 1)).to(torch.uint8)
