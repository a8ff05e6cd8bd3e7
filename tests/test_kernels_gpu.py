"""Compiled Triton kernels on a CUDA device (``pytest -m gpu``; skipped without one).

What the interpreter cannot show: bf16 (the interpreter computes it wrongly), the inline-PTX
dequantization (the interpreter runs its integer-op twin), TMA descriptors and wgmma on sm_90, the
shipped / tuned config paths, ``torch._int_mm``, and CUDA-graph capture of the layers.
"""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                       reason="needs a CUDA device (and TRITON_INTERPRET unset)"),
]

triton = pytest.importorskip("triton")

from ptqkit.kernels import reference  # noqa: E402
from ptqkit.kernels import triton_w8a8 as tw8  # noqa: E402
from ptqkit.kernels import triton_wxa16 as tw  # noqa: E402
from ptqkit.packing import pack  # noqa: E402

UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SHAPES = {"g32": (512, 384, 32), "g64-ragged": (544, 200, 64), "g128-ragged": (1000, 264, 128),
          "per-channel": (320, 136, 320)}


@pytest.fixture(autouse=True)
def _exact_reference():
    """The reference matmul without cuBLAS's reduced-precision reductions."""
    flags = (torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
             torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
             torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    (torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
     torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
     torch.backends.cuda.matmul.allow_tf32) = flags


def layer(bits: int, k: int, n: int, group_len: int, dtype: torch.dtype, act_order: bool, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    g = -(-k // group_len)
    codes = torch.randint(0, 2**bits, (k, n), generator=gen)
    out = dict(qweight=pack(codes, bits), scales=((torch.rand(g, n, generator=gen) + 0.5) * 2 / 2**bits).to(dtype),
               zeros=torch.randint(0, 2**bits, (g, n), generator=gen, dtype=torch.uint8), bits=bits,
               group_len=group_len, perm=torch.randperm(k, generator=gen).to(torch.int32) if act_order else None,
               bias=torch.randn(n, generator=gen).to(dtype))
    return {key: v.cuda() if isinstance(v, torch.Tensor) else v for key, v in out.items()}


def assert_close(out: torch.Tensor, x: torch.Tensor, lay: dict) -> None:
    """Within the K-scaled bound of the fp64 truth from the rounded weights (as the CPU tests)."""
    k = x.shape[-1]
    w = reference.dequantize(lay["qweight"], lay["scales"], lay["zeros"], lay["bits"], lay["group_len"], k)
    w = w.to(x.dtype).double()
    xp = x.double() if lay["perm"] is None else x.double()[..., lay["perm"].long()]
    truth = xp @ w + lay["bias"].double()
    tol = (xp.abs() @ w.abs() + lay["bias"].double().abs()) * (3 * UNIT[x.dtype] + k * 2.0**-24) + 1e-30
    ratio = ((out.double() - truth).abs() / tol).max().item()
    assert out.dtype == x.dtype and ratio <= 1.0, f"error is {ratio:.2f}x the tolerance"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gpu_wxa16_matches_reference(dtype: torch.dtype, bits: int) -> None:
    """Every group layout, act-order on and off, and M on each path (fused M=1 / M<=8 / M<=16 /
    M<=64, dequantize + cuBLAS), cycled over the groups to keep the compile count down."""
    ms = [(1, 33), (5, 300), (16, 1), (64, 7)]
    for i, (group, (k, n, group_len)) in enumerate(SHAPES.items()):
        lay = layer(bits, k, n, group_len, dtype, act_order=i % 2 == 1, seed=bits + i)
        for m in ms[i]:
            x = torch.randn(m, k, device="cuda").to(dtype)
            assert_close(tw.wxa16_linear(x, **lay), x, lay)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", list(SHAPES))
def test_gpu_fast_tile_bit_exact(dtype: torch.dtype, group: str) -> None:
    """The inline-PTX dequantization (magic-number pairs) equals the reference bit for bit."""
    from test_kernels_triton import dequantize_fast

    k, n, group_len = SHAPES[group]
    lay = layer(4, k, n, group_len, dtype, False)
    args = (lay["qweight"], lay["scales"], lay["zeros"])
    for bn, bk, warps in ((64, 64, 4), (256, 128, 4)):
        w = dequantize_fast(*args, group_len, k, block_n=bn, block_k=bk, num_warps=warps)
        assert torch.equal(w, reference.dequantize(*args, 4, group_len, k))


@pytest.mark.parametrize("m", [1, 16, 64])
def test_gpu_every_candidate_config(m: int) -> None:
    """Every config the tuner may pick computes correctly (fp16 and bf16, act-order)."""
    k, n, group_len = 1024, 768, 128
    for dtype in (torch.float16, torch.bfloat16):
        lay = layer(4, k, n, group_len, dtype, act_order=True, seed=m)
        x = torch.randn(m, k, device="cuda").to(dtype)
        for cfg in tw.candidate_configs(m, n, k, group_len, 4, x.device):
            out = tw.run_config(cfg, x, lay["qweight"], lay["scales"], lay["zeros"], 4, group_len, lay["bias"],
                                lay["perm"])
            assert_close(out, x, lay)


def test_gpu_decode_uses_fast_path_and_tma() -> None:
    lay = layer(4, 4096, 4096, 128, torch.float16, False)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    tw.wxa16_linear(x, **lay)
    plan = next(p for key, p in tw._PLANS.items() if key[1:4] == (1, 4096, 4096) and key[6] == torch.float16)
    assert plan.cfg["path"] == "fused" and plan.consts["FAST"] and plan.consts["ONE_ROW"]
    if torch.cuda.get_device_capability()[0] >= 9:
        assert tw._use_tma(lay["qweight"], 4096)


def test_gpu_layers_capture_in_a_cuda_graph() -> None:
    """A QuantLinear (split-K, act-order) and a QuantLinearW8A8 replay inside a CUDA graph."""
    from ptqkit.layers import QuantLinear, QuantLinearW8A8
    from ptqkit.quant import QuantArgs, quantize_weight

    w = torch.randn(2048, 4096)
    codes, scales, zeros = quantize_weight(w, QuantArgs(bits=4, group_size=128, sym=False))
    q = QuantLinear.from_codes(codes, scales, zeros, 4, 128, bias=torch.randn(2048),
                               perm=torch.randperm(4096)).cuda().half()
    w8 = QuantLinearW8A8(4096, 2048, bias=True).cuda().half()
    w8.qweight.copy_(torch.randint(-127, 128, (2048, 4096), dtype=torch.int8))
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    eager = (q(x), w8(x))                                  # warm-up: plans and workspaces exist
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = (q(x), w8(x))
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])


@pytest.mark.parametrize("m", [1, 16, 64, 1024])
def test_gpu_w8a8_paths_agree(m: int) -> None:
    """The Triton int8 GEMM and torch._int_mm + epilogue give the same outputs, equal to the reference's
    int32 accumulators."""
    k, n = 1024, 512
    xq = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    ones_m, ones_n = torch.ones(m, 1, device="cuda"), torch.ones(n, device="cuda")
    acc = reference.int8_matmul(xq, w).float()
    for cfg in tw8.candidate_configs(m, xq.device, n, k):
        assert torch.equal(tw8.int8_gemm(xq, ones_m, w, ones_n, None, torch.float32, cfg), acc), cfg
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ws = torch.rand(n, device="cuda") * 1e-2
    out, ref = tw8.w8a8_linear(x, w, ws), reference.w8a8_linear(x, w, ws)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=1e-3)
