"""Triton kernels against the torch reference, in the Triton CPU interpreter.

Without a CUDA device the module sets ``TRITON_INTERPRET=1`` before triton is imported and runs
every kernel on CPU tensors (fp16/fp32 only: the interpreter mishandles bf16). With a CUDA device
(and no ``TRITON_INTERPRET=1`` in the environment) the same tests run compiled kernels on the GPU.

Tolerances: both sides accumulate in fp32 from weights rounded to the activation dtype (the fused
kernel's tiles are bit-identical to the reference's, :func:`test_fast_tile_bit_exact`). Against an
fp64 truth ``y`` computed from the rounded weights, each output must satisfy
``|out - y| <= (|x| @ |W| + |b|) * (3u + K * 2**-24)``: the fp32 summation error of K terms is at
most ``K * 2**-24`` of ``|x| @ |W|``; ``u`` (unit round-off of the activation dtype) covers the
final rounding and the bias add, with room to spare.

Tests marked ``gpu`` run only on a CUDA device (``pytest -m gpu``): compiled kernels, bf16, the
inline-PTX dequantization, the tuned-config paths.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"   # must precede the first triton import

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from ptqkit import kernels  # noqa: E402
from ptqkit.kernels import autotune, reference  # noqa: E402
from ptqkit.kernels import triton_gemv as tg  # noqa: E402
from ptqkit.kernels import triton_w8a8 as tw8  # noqa: E402
from ptqkit.kernels import triton_wxa16 as tw  # noqa: E402
from ptqkit.packing import pack  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET and type(tg.fused_kernel).__name__ != "InterpretedFunction":  # imported earlier, compiled
    tg = importlib.reload(tg)
    tw, tw8 = importlib.reload(tw), importlib.reload(tw8)
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
DTYPES = [torch.float16, torch.float32] + ([] if INTERPRET else [torch.bfloat16])
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}

# (K, N, group_len): ragged last groups, per-channel, and a length no K-tile divides (dequant path)
GPU = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device")
GROUPS = {
    "g32": (96, 40, 32),
    "g64-ragged": (160, 70, 64),
    "g128-ragged": (300, 33, 128),
    "per-channel": (100, 50, 100),
    "g24-fallback": (72, 20, 24),
}


@triton.jit
def _fast_tile_kernel(q_ptr, q_desc, s_ptr, z_ptr, w_ptr, N, K, KW, G, BN: tl.constexpr, BK: tl.constexpr,
                      GROUP: tl.constexpr, NW: tl.constexpr, ASM: tl.constexpr, USE_TMA: tl.constexpr):
    """The fused kernel's 4-bit dequantization alone: ``W [K, N]`` (stored row order) from the very tiles the
    dot consumes, the slot / feature permutations undone; grid ``(cdiv(K, BK), cdiv(N, BN))``."""
    c = tl.program_id(0)
    n0 = tl.program_id(1) * BN
    GPT: tl.constexpr = BK // GROUP if (GROUP > 0 and GROUP < BK) else 1
    s, z = tg._scales_zeros(s_ptr, z_ptr, c * BK, n0, N, G, BN, GROUP, GPT)
    w = tg._fast_w(q_ptr, q_desc, s, z, c, n0, N, KW, BN, BK, GPT, NW, w_ptr.dtype.element_ty, ASM, USE_TMA)
    k = c * BK + tg.slot_rows(BK)
    n = n0 + tg.feature_of_row(BN, NW)
    tl.store(w_ptr + k[None, :].to(tl.int64) * N + n[:, None], w, mask=(k < K)[None, :] & (n < N)[:, None])


def dequantize_fast(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_len: int,
                    in_features: int, block_n: int = 16, block_k: int = 32, num_warps: int = 1) -> torch.Tensor:
    """``W [K, N]`` through the fused kernel's 4-bit fast-path dequantization (fp16 / bf16 scales), tile by
    tile as the dot sees it: to check it against ``reference.dequantize`` bit for bit (here and on a GPU)."""
    k, n = in_features, qweight.shape[1]
    group = tw._group_const(k, group_len, block_k)
    assert group is not None and scales.dtype in (torch.float16, torch.bfloat16)
    w = torch.zeros(k, n, dtype=scales.dtype, device=qweight.device)
    q_desc = None
    if tw._use_tma(qweight, n):
        from triton.tools.tensor_descriptor import TensorDescriptor
        q_desc = TensorDescriptor.from_tensor(qweight, [block_k // 8, block_n])
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _fast_tile_kernel[grid](qweight, q_desc, scales, zeros, w, n, k, qweight.shape[0], scales.shape[0],
                            BN=block_n, BK=block_k, GROUP=group, NW=num_warps, ASM=not INTERPRET,
                            USE_TMA=q_desc is not None, num_warps=num_warps)
    return w


@pytest.fixture(autouse=True, scope="module")
def _untimed_configs():
    """On a GPU, use the default configs: timing candidates for every tiny test shape only costs time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PTQKIT_AUTOTUNE", "0")
        yield


def make_weight(bits: int, k: int, n: int, group_len: int, dtype: torch.dtype, act_order: bool,
                bias: bool, seed: int = 0) -> dict:
    """Random codes over the full range, asymmetric zero points, positive scales."""
    gen = torch.Generator().manual_seed(seed)
    g = -(-k // group_len)
    codes = torch.randint(0, 2**bits, (k, n), generator=gen)
    layer = dict(
        qweight=pack(codes, bits),
        scales=((torch.rand(g, n, generator=gen) + 0.5) * 2.0 / 2**bits).to(dtype),
        zeros=torch.randint(0, 2**bits, (g, n), generator=gen, dtype=torch.uint8),
        bits=bits,
        group_len=group_len,
        perm=torch.randperm(k, generator=gen).to(torch.int32) if act_order else None,
        bias=torch.randn(n, generator=gen).to(dtype) if bias else None,
    )
    return {key: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for key, v in layer.items()}


def assert_wxa16_close(out: torch.Tensor, x: torch.Tensor, layer: dict) -> None:
    """``out`` within the K-scaled bound of the fp64 truth; the reference must be, too."""
    k = x.shape[-1]
    w = reference.dequantize(layer["qweight"], layer["scales"], layer["zeros"], layer["bits"],
                             layer["group_len"], k).to(x.dtype).double()          # [K, N]
    xp = x.double() if layer["perm"] is None else x.double()[..., layer["perm"].long()]
    b = layer["bias"].double() if layer["bias"] is not None else torch.zeros(w.shape[1], dtype=torch.float64,
                                                                              device=w.device)
    truth = xp @ w + b
    mag = xp.abs() @ w.abs() + b.abs()
    tol = mag * (3 * UNIT[x.dtype] + k * 2.0**-24) + 1e-30
    ref = reference.wxa16_linear(x, **layer)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    for name, y in (("triton", out), ("reference", ref)):
        ratio = ((y.double() - truth).abs() / tol).max().item()
        assert ratio <= 1.0, f"{name} error is {ratio:.2f}x the tolerance"


# --- weight-only --------------------------------------------------------------------------------

@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("m", [1, 3, 16, 17])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_wxa16_matches_reference(bits: int, m: int, group: str) -> None:
    k, n, group_len = GROUPS[group]
    i = bits + m + list(GROUPS).index(group)       # cycle the remaining axes over the grid
    dtype = DTYPES[i % len(DTYPES)]
    act_order, bias = (i // 2) % 2 == 0, (i // 4) % 2 == 0
    layer = make_weight(bits, k, n, group_len, dtype, act_order, bias, seed=i)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(i)).to(dtype).to(DEVICE)
    assert_wxa16_close(tw.wxa16_linear(x, **layer), x, layer)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_wxa16_flags_and_batch_dims(dtype: torch.dtype, act_order: bool, bias: bool) -> None:
    """Every dtype × act-order × bias, with a 3-D input (M = 2*3 = 6 rows)."""
    layer = make_weight(4, 160, 70, 64, dtype, act_order, bias, seed=7)
    x = torch.randn(2, 3, 160).to(dtype).to(DEVICE)
    assert_wxa16_close(tw.wxa16_linear(x, **layer), x, layer)


CONFIGS = {   # forced paths (interpreter-sized tiles; NW = num_warps lays out the feature permutation)
    "fused-split1": dict(path="fused", BLOCK_N=16, BLOCK_K=32, SPLIT_K=1, num_warps=1),
    "fused-split3": dict(path="fused", BLOCK_N=16, BLOCK_K=32, SPLIT_K=3, num_warps=1),
    "fused-bk64-split2": dict(path="fused", BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, num_warps=2),
    "dequant": dict(path="dequant", BLOCK_K=32, BLOCK_N=16),
}


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_wxa16_each_path(bits: int, cfg: str) -> None:
    """Each path and split-K setting, forced, on the ragged K=160 / group 64 layer, act-order."""
    c = {"num_warps": 4, "num_stages": 2, **CONFIGS[cfg]}
    layer = make_weight(bits, 160, 72, 64, torch.float16, act_order=True, bias=True, seed=bits)
    for m in (1, 5):
        x = torch.randn(m, 160).half().to(DEVICE)
        out = tw.run_config(c, x, layer["qweight"], layer["scales"], layer["zeros"], bits, 64, layer["bias"],
                            layer["perm"])
        assert_wxa16_close(out, x, layer)


def test_wxa16_large_m_uses_dequant() -> None:
    layer = make_weight(3, 96, 40, 32, torch.float32, act_order=True, bias=True)
    x = torch.randn(tw.FUSED_MAX_M + 72, 96).to(DEVICE)
    assert_wxa16_close(tw.wxa16_linear(x, **layer), x, layer)
    plans = [p for key, p in tw._PLANS.items() if key[1] > tw.FUSED_MAX_M and key[2:4] == (40, 96)]
    assert plans and all(p.cfg["path"] == "dequant" for p in plans)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_kernel_is_exact(bits: int) -> None:
    """Bit-exact, for fp16 math (fp16 scales) and fp32 math (fp32 scales, fp16 weights)."""
    for i, (k, n, group_len) in enumerate(GROUPS.values()):
        dtype = (torch.float16, torch.float32)[i % 2]
        layer = make_weight(bits, k, n, group_len, dtype, False, False)
        args = (layer["qweight"], layer["scales"], layer["zeros"], bits, group_len, k)
        torch.testing.assert_close(tw.dequantize(*args, torch.float16, block_k=16, block_n=32),
                                   reference.dequantize(*args).half(), rtol=0, atol=0)
        perm = torch.randperm(k).to(DEVICE)                    # act-order: rows land at perm[j]
        w = tw.dequantize(*args, torch.float16, block_k=16, block_n=32, perm=perm)
        assert torch.equal(w[perm.long()], reference.dequantize(*args).half())


@pytest.mark.parametrize("group", ["g32", "g64-ragged", "g128-ragged", "per-channel"])
@pytest.mark.parametrize("tile", [(16, 32, 1), (32, 64, 2), (64, 128, 4)])
def test_fast_tile_bit_exact(group: str, tile: tuple[int, int, int]) -> None:
    """The 4-bit fast path's dequantized tiles (as the dot consumes them, permutations undone) equal
    ``reference.dequantize`` bit for bit: several groups per tile, ragged groups, odd N (no TMA)."""
    k, n, group_len = GROUPS[group]
    bn, bk, warps = tile
    for n_cols in (n, 64):                                       # N % 4 == 0 reads words through a TMA descriptor
        layer = make_weight(4, k, n_cols, group_len, torch.float16, False, False, seed=k + n_cols)
        args = (layer["qweight"], layer["scales"], layer["zeros"])
        w = dequantize_fast(*args, group_len, k, block_n=bn, block_k=bk, num_warps=warps)
        assert torch.equal(w, reference.dequantize(*args, 4, group_len, k))


@pytest.mark.parametrize("m", [1, 17, 80])
def test_wxa16_fp32_scales_fp16_activations(m: int) -> None:
    layer = make_weight(4, 160, 70, 64, torch.float32, act_order=True, bias=True)
    x = torch.randn(m, 160).half().to(DEVICE)
    assert_wxa16_close(tw.wxa16_linear(x, **layer), x, layer)


def test_wxa16_rejects_mismatched_layout() -> None:
    layer = make_weight(4, 96, 40, 32, torch.float32, False, False)
    with pytest.raises(ValueError, match="do not fit"):
        tw.wxa16_linear(torch.randn(1, 100).to(DEVICE), **layer)


def test_gpu_candidates_respect_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU config lists (built without a GPU): fused K tiles fit the groups; paths by M."""
    monkeypatch.setattr(autotune, "sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    for bits in (2, 3, 4, 8):
        for group_len in (32, 64, 128, 8192):
            c1 = tw.candidate_configs(1, 8192, 8192, group_len, bits, cuda)
            c16 = tw.candidate_configs(16, 8192, 8192, group_len, bits, cuda)
            c64 = tw.candidate_configs(64, 8192, 8192, group_len, bits, cuda)
            assert {c["path"] for c in c1} == {"fused"} and {c["path"] for c in c16} == {"fused"}
            assert {c["path"] for c in c64} == {"fused", "dequant"}
            assert [c["path"] for c in tw.candidate_configs(128, 8192, 8192, group_len, bits, cuda)] == ["dequant"]
            for c in c1 + c16:
                assert tw.fused_fits(c, 8192, group_len, bits)
                assert group_len % c["BLOCK_K"] == 0 or c["BLOCK_K"] % group_len == 0
    assert [c["path"] for c in tw.candidate_configs(512, 4096, 4096, 128, 4, cuda)] == ["dequant"]
    assert [c["path"] for c in tw.candidate_configs(1, 4096, 4096, 100, 4, cuda)] == ["dequant"]


def test_table_config_for_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """On sm_90 the shipped table gives the M=1 W4 g128 problem its fused config (no GPU needed)."""
    monkeypatch.setattr(autotune, "capability", lambda index: (9, 0))
    monkeypatch.setattr(autotune, "sm_count", lambda index: 132)
    monkeypatch.setattr(tw, "STORE", autotune.ConfigStore("wxa16-test"))
    cfg = tw.default_config(1, 8192, 8192, 128, 4, torch.device("cuda", 0))
    assert cfg == autotune.TABLE["sm90"][("wxa16", 1, 4, "g>=128")]
    plan = tw.plan_params(cfg, 1, 8192, 8192, 128, 4, torch.float16, torch.float16, torch.device("cuda", 0),
                          False, False)
    assert plan.consts["FAST"] and plan.consts["ONE_ROW"] and plan.splits == 8 and plan.grid == (32, 8, 1)


@pytest.mark.parametrize("m", [1, 16, 100])
def test_gpu_default_configs_compute_correctly(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first GPU candidate (big tiles) on a problem smaller than its tiles."""
    monkeypatch.setattr(autotune, "sm_count", lambda index: 132)
    layer = make_weight(4, 256, 90, 128, torch.float16, act_order=False, bias=True)
    x = torch.randn(m, 256).half().to(DEVICE)
    cfg = tw.candidate_configs(m, 90, 256, 128, 4, torch.device("cuda", 0))[0]
    out = tw.run_config(cfg, x, layer["qweight"], layer["scales"], layer["zeros"], 4, 128, layer["bias"])
    assert_wxa16_close(out, x, layer)
    a = torch.randint(-127, 128, (m, 96), dtype=torch.int8).to(DEVICE)
    b = torch.randint(-127, 128, (40, 96), dtype=torch.int8).to(DEVICE)
    cfg8 = tw8.candidate_configs(m, torch.device("cuda", 0))[0]
    out8 = tw8.int8_gemm(a, torch.ones(m, 1, device=DEVICE), b, torch.ones(40, device=DEVICE), None,
                         torch.float32, cfg8)
    assert torch.equal(out8, reference.int8_matmul(a, b).float())


def test_split_k_is_deterministic_and_resets_its_counters() -> None:
    """In-kernel split-K: the last split sums the partials in split order, so repeated calls agree
    bit for bit, and it leaves the arrival counters at zero for the next launch."""
    layer = make_weight(4, 300, 48, 32, torch.float16, act_order=True, bias=True, seed=3)
    x = torch.randn(3, 300).half().to(DEVICE)
    cfg = dict(CONFIGS["fused-split3"], num_stages=2)
    plan = tw.make_plan(cfg, 3, 48, 300, 32, 4, x.dtype, x.dtype, x.device, True, True)
    assert plan.splits == 3 and plan.consts["SPLIT"]
    args = (x, layer["qweight"], layer["scales"], layer["zeros"], 4, 32, layer["bias"], layer["perm"])
    first = tw.launch(plan, *args)
    assert torch.equal(plan.cnt, torch.zeros_like(plan.cnt))
    assert torch.equal(tw.launch(plan, *args), first)
    assert_wxa16_close(first, x, layer)


def test_plan_is_cached_and_calls_never_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call is a dict lookup plus a launch: the plan is built once per shape, nothing is timed."""
    monkeypatch.setattr(autotune, "time_cold", lambda fn: pytest.fail("timing inside a call"))
    monkeypatch.setattr(tw, "_PLANS", {})
    built = []
    real = tw.make_plan
    monkeypatch.setattr(tw, "make_plan", lambda *a, **kw: built.append(a) or real(*a, **kw))
    layer = make_weight(4, 96, 44, 32, torch.float16, False, False)
    x = torch.randn(1, 96).half().to(DEVICE)
    for _ in range(3):
        tw.wxa16_linear(x, **layer)
    assert len(built) == 1


# --- W8A8# --- W8A8 ---------------------------------------------------------------------------------------

def test_quantize_per_token_ties_and_zero_rows() -> None:
    """Halves after division round to even (2.5 -> 2, 3.5 -> 4, -2.5 -> -2) like torch.round."""
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 126.5],
                      [0.0] * 8,
                      [-254.0, 5.0, 7.0, -9.0, 1.0, 3.0, 0.0, 253.0]]).to(DEVICE)
    q, s = tw8.quantize_per_token(x)
    rq, rs = reference.quantize_per_token(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    assert q[0, 1:5].tolist() == [2, 4, -2, -4]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 100), (3, 160), (16, 96), (17, 300)])
def test_quantize_activations_exact(m: int, k: int, dtype: torch.dtype) -> None:
    x = (torch.randn(m, k) * torch.logspace(-3, 2, m)[:, None]).to(dtype).to(DEVICE)
    q, s = tw8.quantize_per_token(x)
    rq, rs = reference.quantize_per_token(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    scale = torch.tensor(0.0123, device=DEVICE)
    assert torch.equal(tw8.quantize_per_tensor(x, scale), reference.quantize_per_tensor(x, scale))


@pytest.mark.parametrize("m,k,n", [(1, 100, 40), (3, 160, 70), (16, 96, 33), (17, 300, 50)])
def test_int8_gemm_accumulator_exact(m: int, k: int, n: int) -> None:
    """With unit scales and an fp32 output the int32 accumulator is read back exactly (< 2**24)."""
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8).to(DEVICE)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8).to(DEVICE)
    ones = torch.ones(n, device=DEVICE)
    out = tw8.int8_gemm(a, torch.ones(m, 1, device=DEVICE), b, ones, None, torch.float32)
    assert torch.equal(out, reference.int8_matmul(a, b).float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 100, 40), (3, 160, 70), (16, 96, 33), (17, 300, 50)])
def test_w8a8_matches_reference(m: int, k: int, n: int, bias: bool, static: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(m + k)
    x = (torch.randn(2, m, k, generator=gen) * 3).to(dtype).to(DEVICE)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(DEVICE)
    ws = (torch.rand(n, generator=gen) * 0.01 + 1e-3).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    s_in = torch.tensor(3 * 4.0 / 127, device=DEVICE) if static else None
    out = tw8.w8a8_linear(x, w, ws, b, s_in)
    ref = reference.w8a8_linear(x, w, ws, b, s_in)
    assert out.shape == ref.shape == (2, m, n) and out.dtype == ref.dtype
    # same int32 accumulator and the same fp32 epilogue: only a possible fused multiply-add and
    # the final rounding to the output dtype can differ
    x2 = x.reshape(-1, k)                                                    # [2m, K]
    if static:
        xq, xs = reference.quantize_per_tensor(x2, s_in), s_in.reshape(1, 1)
    else:
        xq, xs = reference.quantize_per_token(x2)
    acc = reference.int8_matmul(xq, w)                                       # [2m, N] int32
    mag = (acc.double().abs() * xs.double() * ws.double()).reshape(2, m, n)
    if b is not None:
        mag = mag + b.double().abs()
    tol = mag * (2 * UNIT[dtype] + 4 * 2.0**-24) + 1e-30
    assert ((out.double() - ref.double()).abs() <= tol).all()


@pytest.mark.parametrize("static", [False, True])
def test_w8a8_int_mm_path_matches_fused(static: bool) -> None:
    """``torch._int_mm`` + the Triton scale epilogue gives the fused GEMM's outputs."""
    m, k, n = 24, 64, 40
    gen = torch.Generator().manual_seed(5)
    xq = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8).to(DEVICE)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(DEVICE)
    xs = (torch.rand(1 if static else m, 1, generator=gen) * 0.1).to(DEVICE)
    ws = (torch.rand(n, generator=gen) * 0.01).to(DEVICE)
    b = torch.randn(n, generator=gen).half().to(DEVICE)
    fused = tw8.int8_gemm(xq, xs, w, ws, b, torch.float16, tw8.candidate_configs(m, torch.device("cpu"))[0])
    via_int_mm = tw8.int8_gemm(xq, xs, w, ws, b, torch.float16, tw8.INT_MM)
    assert torch.equal(fused, via_int_mm)


def test_w8a8_path_choice_is_made_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autotune, "time_cold", lambda fn: pytest.fail("timing inside a call"))
    monkeypatch.setattr(tw8, "_PATHS", {})
    x = torch.randn(3, 64).half().to(DEVICE)
    w = torch.randint(-127, 128, (24, 64), dtype=torch.int8).to(DEVICE)
    ws = torch.rand(24).to(DEVICE) * 0.01
    for _ in range(2):
        tw8.w8a8_linear(x, w, ws)
    assert len(tw8._PATHS) == 1


# --- selection ----------------------------------------------------------------------------------

def test_select_forced_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTQKIT_KERNEL", "triton")
    assert kernels.select("cpu", "wxa16").__module__ == tw.__name__
    assert kernels.select("cpu", "w8a8").__module__ == tw8.__name__
    monkeypatch.setenv("PTQKIT_KERNEL", "reference")
    assert kernels.select(DEVICE, "wxa16") is reference.wxa16_linear


def test_layers_run_triton_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    from ptqkit.layers import QuantLinear, QuantLinearW8A8
    from ptqkit.quant import QuantArgs, quantize_weight

    w = torch.randn(50, 160)
    codes, scales, zeros = quantize_weight(w, QuantArgs(bits=3, group_size=64, sym=False))
    layer = QuantLinear.from_codes(codes, scales, zeros, 3, 64, bias=torch.randn(50),
                                   perm=torch.randperm(160)).to(DEVICE)
    w8 = QuantLinearW8A8(160, 50, bias=True).to(DEVICE)
    w8.qweight.copy_(torch.randint(-127, 128, (50, 160), dtype=torch.int8))
    w8.weight_scale.uniform_(1e-3, 1e-2)
    x = torch.randn(2, 3, 160).to(DEVICE)
    monkeypatch.setenv("PTQKIT_KERNEL", "reference")
    ref, ref8 = layer(x), w8(x)
    monkeypatch.setenv("PTQKIT_KERNEL", "triton")
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w8(x), ref8, rtol=1e-6, atol=1e-6)


def test_config_store_off_gpu() -> None:
    """Off the GPU nothing is stored or looked up on disk; the heuristic default is used."""
    store = autotune.ConfigStore("t")
    assert store.lookup("k", torch.device("cpu"), ("wxa16", 1, 4, "g>=128")) is None and store.best == {}
    assert not autotune.can_time(torch.device("cpu"))
    assert [autotune.m_bucket(m) for m in (1, 2, 3, 16, 17, 300)] == [1, 2, 4, 16, 32, 512]
    assert [autotune.m_class(m) for m in (1, 2, 9, 17)] == [1, 8, 16, 32]


def test_config_store_tunes_and_persists(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tune times every candidate (a failing one scores inf), keeps the fastest, writes it to the
    cache directory, and a fresh store reads it back (GPU name faked: no GPU needed)."""
    monkeypatch.setenv("PTQKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(autotune, "time_cold", lambda fn: fn())
    cuda = torch.device("cuda", 0)

    def run(c):
        if c["t"] is None:
            raise RuntimeError("does not compile")
        return c["t"]

    store = autotune.ConfigStore("t")
    cfg, timings = store.tune("k", [{"t": 3.0}, {"t": None}, {"t": 1.0}], run, cuda)
    assert cfg == {"t": 1.0} and [t for _, t in timings][1] == float("inf")
    assert autotune.ConfigStore("t").lookup("k", cuda) == {"t": 1.0}
    assert any(p.name.startswith("t-Fake_GPU") for p in tmp_path.iterdir())
