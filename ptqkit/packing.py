"""Bit-packing of integer codes into int32 words.

Codes are packed as a little-endian bitstream along dim 0: code ``i`` of a column
occupies bits ``[i*bits, (i+1)*bits)`` of the stream, word ``(i*bits) // 32``.
For 2/4/8 bits this is exactly the GPTQ ``qweight`` layout (``32/bits`` codes per
word); for 3 bits it is GPTQ's layout too (32 codes in 3 words, two codes straddle
word boundaries). Any bit width 1..8 works.

When ``bits`` divides 32 (1, 2, 4, 8) a word holds ``32/bits`` whole codes and both directions
are a shift-and-or over int32 ``[W, 32/bits, N]`` (several times faster on big layers). Otherwise
every 32 codes fill exactly ``bits`` words, so both directions work on units of 32 codes
``[U, 32, N] <-> [U, bits, N]`` with one vectorized step per code position.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def packed_rows(rows: int, bits: int) -> int:
    """Number of int32 words needed for ``rows`` codes of ``bits`` bits."""
    return (rows * bits + 31) // 32


def _positions(bits: int) -> list[tuple[int, int, int]]:
    """For each of the 32 codes of a unit: (word, shift, bits spilling into word + 1)."""
    out = []
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        out.append((word, shift, max(0, shift + bits - 32)))
    return out


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[K, N]`` (values in ``[0, 2**bits)``) into int32 ``[ceil(K*bits/32), N]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if 32 % bits == 0:  # code i of word w at bits [i*bits, (i+1)*bits)
        per = 32 // bits
        c = codes.to(torch.int32) & ((1 << bits) - 1)
        if c.shape[0] % per:
            c = torch.nn.functional.pad(c, (0, 0, 0, per - c.shape[0] % per))
        c = c.reshape(-1, per, c.shape[1])                              # [W, per, N]
        out = c[:, 0].clone()
        for i in range(1, per):
            out |= c[:, i] << (i * bits)                                # wraps into the sign bit
        return out
    k, n = codes.shape
    units = (k + 31) // 32
    c = torch.nn.functional.pad(codes.to(torch.int64) & ((1 << bits) - 1), (0, 0, 0, units * 32 - k))
    c = c.view(units, 32, n)                                       # [U, 32, N]
    out = torch.zeros(units, bits, n, dtype=torch.int64, device=codes.device)  # [U, bits, N]
    for i, (word, shift, spill) in enumerate(_positions(bits)):
        out[:, word] |= (c[:, i] << shift) & _MASK32
        if spill:
            out[:, word + 1] |= c[:, i] >> (bits - spill)
    out = out.view(units * bits, n)[: packed_rows(k, bits)]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 ``[words, N]`` -> uint8 codes ``[rows, N]``."""
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        out = (packed.to(torch.int32).unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)  # [W, per, N]
        return out.reshape(-1, packed.shape[1])[:rows].to(torch.uint8)
    words, n = packed.shape
    units = (rows + 31) // 32
    p = torch.zeros(units * bits, n, dtype=torch.int64, device=packed.device)
    p[:words] = packed.to(torch.int64) & _MASK32
    p = p.view(units, bits, n)                                     # [U, bits, N]
    mask = (1 << bits) - 1
    out = torch.empty(units, 32, n, dtype=torch.uint8, device=packed.device)  # [U, 32, N]
    for i, (word, shift, spill) in enumerate(_positions(bits)):
        v = p[:, word] >> shift
        if spill:
            v = v | (p[:, word + 1] << (bits - spill))
        out[:, i] = v & mask
    return out.view(units * 32, n)[:rows]

