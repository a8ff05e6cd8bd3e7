"""Packing and quantization round trips: every bit width, group sizes including ragged ones."""
from __future__ import annotations

import pytest
import torch

from ptqkit.layers import QuantLinear
from ptqkit.packing import pack, packed_rows, unpack
from ptqkit.quant import QuantArgs, dequantize_weight, find_qparams, quantize_weight


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("rows", [1, 7, 32, 33, 96, 576])
def test_pack_unpack_round_trip(bits, rows):
    codes = torch.randint(0, 2**bits, (rows, 5))
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (packed_rows(rows, bits), 5)
    assert torch.equal(unpack(packed, bits, rows).long(), codes)


def test_pack_matches_gptq_layout():
    # 4 bits: eight codes per word, code i at bits 4i..4i+3
    assert pack(torch.arange(8).reshape(8, 1), 4).item() == 0x76543210
    # 3 bits: 32 codes in 3 words; code 10 straddles word 0 (bits 30-31) and word 1 (bit 0)
    codes = torch.zeros(32, 1, dtype=torch.long)
    codes[10] = 0b111
    words = [int(w) & 0xFFFFFFFF for w in pack(codes, 3)[:, 0]]
    assert words == [0xC0000000, 0x1, 0x0]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
def test_quantize_dequantize_error_bounded(bits, sym, group_size):
    torch.manual_seed(bits)
    w = torch.randn(24, 576)  # 576 = 4×128 + 64: group 128 is ragged
    args = QuantArgs(bits=bits, group_size=group_size, sym=sym)
    codes, scales, zeros = quantize_weight(w, args)
    g = args.group_len(576)
    assert scales.shape == (24, -(-576 // g)) and codes.max() <= 2**bits - 1
    wq = dequantize_weight(codes, scales, zeros, g)
    gidx = torch.arange(576) // g
    # every weight lies inside its group's range, so round-to-nearest is off by at most half a step
    # (symmetric grids clip the largest positive value by up to one step)
    bound = scales[:, gidx] * (1.0 if sym else 0.5) + 1e-6
    assert ((wq - w).abs() <= bound).all()
    # and the error shrinks with more bits
    if bits < 8:
        c8, s8, z8 = quantize_weight(w, QuantArgs(bits=8, group_size=group_size, sym=sym))
        assert (dequantize_weight(c8, s8, z8, g) - w).pow(2).mean() < (wq - w).pow(2).mean()


def test_ragged_group_uses_only_its_own_columns():
    torch.manual_seed(0)
    w = torch.randn(8, 576)
    args = QuantArgs(bits=4, group_size=128, sym=False)
    _, scales, zeros = quantize_weight(w, args)
    s_last, z_last = find_qparams(w[:, 512:], args)  # the 64-column tail group on its own
    assert torch.allclose(scales[:, -1], s_last) and torch.equal(zeros[:, -1].float(), z_last)


def test_mse_clip_search_lowers_error():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[:, 0] *= 8  # outliers make clipping worthwhile
    plain = QuantArgs(bits=3, group_size=64)
    clipped = QuantArgs(bits=3, group_size=64, mse=True)
    err = {}
    for name, a in (("plain", plain), ("mse", clipped)):
        c, s, z = quantize_weight(w, a)
        err[name] = (dequantize_weight(c, s, z, 64) - w).abs().pow(2.4).sum()
    assert err["mse"] < 0.95 * err["plain"]


@pytest.mark.parametrize("act_order", [False, True])
def test_quant_linear_matches_dequantized_matmul(act_order):
    torch.manual_seed(0)
    w = torch.randn(40, 160)
    args = QuantArgs(bits=3, group_size=64)  # 160 = 2×64 + 32: ragged
    perm = torch.randperm(160) if act_order else None
    stored = w[:, perm] if act_order else w
    codes, scales, zeros = quantize_weight(stored, args)
    layer = QuantLinear.from_codes(codes, scales, zeros, 3, 64, bias=torch.randn(40), perm=perm)
    wq = dequantize_weight(codes, scales, zeros, 64)
    w_orig = torch.empty_like(wq)
    w_orig[:, perm if act_order else slice(None)] = wq
    x = torch.randn(5, 160)
    assert torch.equal(layer.dequantize(), w_orig)
    torch.testing.assert_close(layer(x), x @ w_orig.t() + layer.bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.codes().long(), codes.long())


@pytest.mark.parametrize("kw, msg", [
    (dict(bits=1), r"bits\n.*greater than or equal to 2"), (dict(bits=9), r"bits\n.*less than or equal to 8"),
    (dict(group_size=0), "group_size=0"), (dict(mse_maxshrink=1.5), "mse_maxshrink"), (dict(sym="false"), "sym"),
])
def test_quant_args_reject_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        QuantArgs(**kw)
