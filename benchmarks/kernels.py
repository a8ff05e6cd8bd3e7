"""Benchmark the Triton kernels against torch fp16 matmul (cuBLAS) on a CUDA GPU.

    python benchmarks/kernels.py            # W4A16 (group 128) and W8A8 tables
    python benchmarks/kernels.py --check    # first verify every candidate config on these shapes
    python benchmarks/kernels.py --only w8a8 --shapes 8192x8192

For each M and weight shape (N×K) it prints the kernel time in µs, effective TB/s (bytes of packed
weights + scales + zeros + activations + output, over the time) and the speedup over
``F.linear`` in fp16, measured twice: ``triton.testing.do_bench`` (L2 flushed before every call,
launch gaps included) and ``triton.testing.do_bench_cudagraph`` (replayed CUDA graph, hot L2).
The first call per shape autotunes (set ``PTQKIT_AUTOTUNE=0`` to skip) and is not timed.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (11008, 4096), (8192, 8192), (28672, 8192)]   # (N, K)
WXA16_MS = [1, 16, 64, 256]
W8A8_MS = [16, 256, 1024, 4096]


def _time(fn: Callable[[], object]) -> tuple[float, float]:
    """(cold-L2 µs, CUDA-graph µs) of ``fn``."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    cold = triton.testing.do_bench(fn, warmup=25, rep=100)
    hot = triton.testing.do_bench_cudagraph(fn, rep=50)
    return cold * 1e3, hot * 1e3


def _wxa16_layer(n: int, k: int, bits: int, group: int, dtype: torch.dtype, seed: int = 0,
                 device: str | torch.device = "cuda") -> dict:
    """Random packed words are valid codes: every bit pattern decodes to some code."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    g = -(-k // group)
    words = (k * bits + 31) // 32
    return dict(
        qweight=torch.randint(-2**31, 2**31, (words, n), generator=gen, device=dev, dtype=torch.int32),
        scales=(torch.rand(g, n, generator=gen, device=dev) * 0.02 + 0.005).to(dtype),
        zeros=torch.randint(0, 2**bits, (g, n), generator=gen, device=dev, dtype=torch.uint8),
        bits=bits,
        group_len=group,
    )


def _wxa16_tol(x: torch.Tensor, layer: dict, bias: torch.Tensor) -> torch.Tensor:
    """Allowed ``|out - ref|`` per output: twice the K-scaled bound of the tests (each side within it)."""
    from ptqkit.kernels import reference

    k = x.shape[-1]
    w = reference.dequantize(layer["qweight"], layer["scales"], layer["zeros"], layer["bits"],
                             layer["group_len"], k).float()
    mag = x.float().abs() @ w.abs() + bias.float().abs()
    unit = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}[x.dtype]
    return 2 * mag * (3 * unit + k * 2.0**-24) * 1.01 + 1e-6


def _ratio(out: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs() / tol).max().item()


def check(shapes: list[tuple[int, int]], only: str | None, device: str = "cuda",
          dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)) -> bool:
    """Verify the kernels (every candidate config) against the reference."""
    from ptqkit.kernels import reference, triton_w8a8 as tw8, triton_wxa16 as tw

    ok = True
    dev = torch.device(device)
    for n, k in shapes:
        if only in (None, "wxa16"):
            for dtype in dtypes:
                layer = _wxa16_layer(n, k, 4, 128, dtype, seed=n + k, device=dev)
                bias = torch.randn(n, device=dev, dtype=dtype)
                for m in WXA16_MS:
                    x = torch.randn(m, k, device=dev, dtype=dtype)
                    ref = reference.wxa16_linear(x, **layer, bias=bias)
                    tol = _wxa16_tol(x, layer, bias)
                    worst, failed = 0.0, []
                    for cfg in tw.candidate_configs(m, n, k, 128, 4, dev):
                        out = tw.run_config(cfg, x, layer["qweight"], layer["scales"], layer["zeros"],
                                            4, 128, bias)
                        r = _ratio(out, ref, tol)
                        worst = max(worst, r)
                        if not r <= 1.0:
                            failed.append(cfg)
                    r = _ratio(tw.wxa16_linear(x, **layer, bias=bias), ref, tol)
                    status = "ok" if not failed and r <= 1.0 else "FAIL"
                    ok &= status == "ok"
                    print(f"check W4A16 {str(dtype)[6:]:>8} M={m:<5} {n}x{k}: {status} "
                          f"(worst error {max(worst, r):.3f} of tolerance)")
                    for cfg in failed:
                        print(f"    failing config: {cfg}")
        if only in (None, "w8a8"):
            gen = torch.Generator(device=dev).manual_seed(n * k)
            w = torch.randint(-127, 128, (n, k), generator=gen, device=dev, dtype=torch.int8)
            ws = torch.rand(n, generator=gen, device=dev) * 1e-3 + 1e-4
            bias = torch.randn(n, device=dev, dtype=torch.float16)
            for m in W8A8_MS:
                x = torch.randn(m, k, device=dev, dtype=torch.float16) * 4
                q, s = tw8.quantize_per_token(x)
                rq, rs = reference.quantize_per_token(x)
                same_q = torch.equal(q, rq) and torch.equal(s, rs)
                acc = reference.int8_matmul(rq, w).float()
                ones = torch.ones(n, device=dev)
                same_acc = all(torch.equal(tw8.int8_gemm(rq, torch.ones(m, 1, device=dev), w, ones, None,
                                                         torch.float32, cfg), acc)
                               for cfg in tw8.candidate_configs(m, dev))
                out, ref = tw8.w8a8_linear(x, w, ws, bias), reference.w8a8_linear(x, w, ws, bias)
                mag = acc.abs() * rs * ws + bias.float().abs()
                close = bool(((out.float() - ref.float()).abs() <= mag * 2.0**-10 + 1e-6).all())
                status = "ok" if same_q and same_acc and close else "FAIL"
                ok &= status == "ok"
                print(f"check W8A8 M={m:<5} {n}x{k}: {status} (int8 codes equal: {same_q}, "
                      f"int32 accumulators equal for every config: {same_acc}, outputs close: {close})")
    return ok


def bench_wxa16(shapes: list[tuple[int, int]], bits: int, group: int) -> None:
    from ptqkit.kernels import triton_wxa16 as tw
    from ptqkit.kernels.autotune import m_bucket

    print(f"\nW{bits}A16 group {group}, fp16 activations; speedup = torch fp16 F.linear time / kernel time")
    print(f"{'M':>5} {'N':>6} {'K':>6} | {'cold L2 (do_bench)':^32} | {'CUDA graph, hot L2':^32} | path")
    print(f"{'':19} | {'us':>7} {'TB/s':>6} {'fp16 us':>8} {'speedup':>8} | "
          f"{'us':>7} {'TB/s':>6} {'fp16 us':>8} {'speedup':>8} |")
    for n, k in shapes:
        layer = _wxa16_layer(n, k, bits, group, torch.float16)
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
        for m in WXA16_MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            q_bytes = sum(layer[t].numel() * layer[t].element_size() for t in ("qweight", "scales", "zeros"))
            io = 2 * (m * k + m * n)
            t_q = _time(lambda: tw.wxa16_linear(x, **layer))
            t_16 = _time(lambda: F.linear(x, w16))
            cfg = tw._TUNER.best.get((m_bucket(m), n, k, group, bits, x.dtype, layer["scales"].dtype, False))
            cols = []
            for tq, t16 in zip(t_q, t_16):
                cols.append(f"{tq:7.1f} {(q_bytes + io) / tq / 1e6:6.2f} {t16:8.1f} {t16 / tq:7.2f}x")
            print(f"{m:5d} {n:6d} {k:6d} | {cols[0]} | {cols[1]} | {_describe(cfg)}")


def bench_w8a8(shapes: list[tuple[int, int]]) -> None:
    from ptqkit.kernels import triton_w8a8 as tw8

    print("\nW8A8 (per-token dynamic int8 activations, quantization included), fp16 in/out")
    print(f"{'M':>5} {'N':>6} {'K':>6} | {'cold L2 (do_bench)':^39} | {'CUDA graph, hot L2':^39}")
    print(f"{'':19} | {'us':>7} {'TB/s':>6} {'TFLOP/s':>7} {'fp16 us':>8} {'speedup':>7} | "
          f"{'us':>7} {'TB/s':>6} {'TFLOP/s':>7} {'fp16 us':>8} {'speedup':>7}")
    for n, k in shapes:
        w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        ws = torch.rand(n, device="cuda") * 1e-3
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
        for m in W8A8_MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            nbytes = n * k + 4 * n + 2 * (m * k + m * n)
            t_q = _time(lambda: tw8.w8a8_linear(x, w, ws))
            t_16 = _time(lambda: F.linear(x, w16))
            cols = [f"{tq:7.1f} {nbytes / tq / 1e6:6.2f} {2 * m * n * k / tq / 1e6:7.1f} {t16:8.1f} "
                    f"{t16 / tq:6.2f}x" for tq, t16 in zip(t_q, t_16)]
            print(f"{m:5d} {n:6d} {k:6d} | {cols[0]} | {cols[1]}")


def _describe(cfg: dict | None) -> str:
    if cfg is None:
        return "untuned"
    tiles = "x".join(str(cfg[key]) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if key in cfg)
    split = f" split-K {cfg['SPLIT_K']}" if cfg.get("SPLIT_K", 1) > 1 else ""
    return f"{cfg['path']} {tiles}{split}"


def _parse_shape(s: str) -> tuple[int, int]:
    n, k = s.lower().split("x")
    return int(n), int(k)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="verify the kernels against the reference first")
    p.add_argument("--only", choices=["wxa16", "w8a8"], help="run one kernel family")
    p.add_argument("--shapes", nargs="+", type=_parse_shape, default=SHAPES, metavar="NxK")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("-v", "--verbose", action="store_true", help="log the autotuner's choices")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "for CPU correctness tests run: TRITON_INTERPRET=1 python -m pytest tests/test_kernels_triton.py",
              file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/kernels.py needs triton (pip install triton)", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if args.check:
        if not check(args.shapes, args.only):
            print("check FAILED", file=sys.stderr)
            return 1
        print("check passed")
    if args.only in (None, "wxa16"):
        bench_wxa16(args.shapes, args.bits, args.group)
    if args.only in (None, "w8a8"):
        bench_w8a8(args.shapes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
