"""Check and time the Triton kernels against the torch reference and cuBLAS on a CUDA GPU.

    python benchmarks/kernels.py            # W4A16 (group 128) and W8A8 tables
    python benchmarks/kernels.py --check    # first verify every candidate config on these shapes
    python benchmarks/kernels.py --only w8a8 --shapes 8192x8192 --ms 1 16

Timing: cold-L2 CUDA graphs. One graph replays the call on R copies of the weights, R chosen so
the copies are at least twice the L2 cache, so every call reads its weights from DRAM, as a layer
in a model does; there are no launch gaps (as in a captured decode step). Per call: µs, effective
TB/s (bytes of packed weights + scales + zeros + activations + output, over the time) and the
speedup over the baseline timed the same way: ``F.linear`` in fp16 (cuBLAS) for W4A16,
``torch._int_mm`` (cuBLAS int8, activation quantization and the scale epilogue included) for W8A8.

``--check`` runs every candidate config in its own ``try`` (a config that fails to compile is
reported, not fatal) against the reference computed with cuBLAS's reduced-precision reductions
off. Used by ``benchmarks/gpu_check.py``; on a CPU (``TRITON_INTERPRET=1``) the same functions
run on tiny shapes with wall-clock "timings" that only show the code works.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (8192, 8192)]                                  # (N, K)
LLAMA3_8B = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # q/o, k/v, gate/up, down
MS = [1, 16, 64, 256, 1024, 4096]


@contextlib.contextmanager
def exact_reference() -> Iterator[None]:
    """cuBLAS without reduced-precision (fp16 / bf16 / tf32) reductions, for reference matmuls."""
    m = torch.backends.cuda.matmul
    saved = (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction, m.allow_tf32)
    m.allow_fp16_reduced_precision_reduction = m.allow_bf16_reduced_precision_reduction = m.allow_tf32 = False
    try:
        yield
    finally:
        (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction, m.allow_tf32) = saved


def wxa16_layer(n: int, k: int, bits: int, group: int, dtype: torch.dtype, seed: int = 0,
                device: str | torch.device = "cuda", act_order: bool = False) -> dict:
    """Random packed words are valid codes: every bit pattern decodes to some code."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    g = -(-k // group)
    return dict(
        qweight=torch.randint(-2**31, 2**31, ((k * bits + 31) // 32, n), generator=gen, device=dev, dtype=torch.int32),
        scales=(torch.rand(g, n, generator=gen, device=dev) * 0.02 + 0.005).to(dtype),
        zeros=torch.randint(0, 2**bits, (g, n), generator=gen, device=dev, dtype=torch.uint8),
        bits=bits, group_len=group,
        perm=torch.randperm(k, generator=gen, device=dev).to(torch.int32) if act_order else None,
    )


def wxa16_tol(x: torch.Tensor, layer: dict, bias: torch.Tensor) -> torch.Tensor:
    """Allowed ``|out - ref|`` per output: twice the K-scaled bound of the tests (each side within it)."""
    from ptqkit.kernels import reference

    k = x.shape[-1]
    w = reference.dequantize(layer["qweight"], layer["scales"], layer["zeros"], layer["bits"],
                             layer["group_len"], k).float()
    xp = x.float() if layer.get("perm") is None else x.float()[:, layer["perm"].long()]
    mag = xp.abs() @ w.abs() + bias.float().abs()
    unit = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}[x.dtype]
    return 2 * mag * (3 * unit + k * 2.0**-24) * 1.01 + 1e-6


def ratio(out: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor) -> float:
    r = ((out.float() - ref.float()).abs() / tol).max().item()
    return r if math.isfinite(r) else math.inf


def check_wxa16(shapes: list[tuple[int, int]], ms: list[int], dtypes: tuple[torch.dtype, ...],
                device: torch.device, bits: int = 4, group: int = 128, act_order: bool = True,
                cand_device: torch.device | None = None) -> list[tuple[str, bool, str]]:
    """Every candidate config (of ``cand_device``'s list, default ``device``'s) and the default path
    against the reference: ``(label, ok, detail)``."""
    from ptqkit.kernels import reference
    from ptqkit.kernels import triton_wxa16 as tw

    rows = []
    for n, k in shapes:
        for dtype in dtypes:
            layer = wxa16_layer(n, k, bits, group, dtype, seed=n + k, device=device, act_order=act_order)
            bias = torch.randn(n, device=device, dtype=dtype)
            for m in ms:
                x = torch.randn(m, k, device=device, dtype=dtype)
                with exact_reference():
                    ref = reference.wxa16_linear(x, **layer, bias=bias)
                tol, worst, failed = wxa16_tol(x, layer, bias), 0.0, []
                cands = tw.candidate_configs(m, n, k, group, bits, cand_device or device)
                for cfg in cands:
                    try:
                        r = ratio(tw.run_config(cfg, x, layer["qweight"], layer["scales"], layer["zeros"], bits,
                                                group, bias, layer["perm"]), ref, tol)
                    except Exception as e:  # noqa: BLE001 -- one failing config must not hide the others
                        r, cfg = math.inf, dict(cfg, error=f"{type(e).__name__}: {str(e)[:120]}")
                    worst = max(worst, r)
                    if not r <= 1.0:
                        failed.append(cfg)
                r = ratio(tw.wxa16_linear(x, **layer, bias=bias), ref, tol)
                ok = not failed and r <= 1.0
                detail = (f"{len(cands)} configs + default path, worst error {max(worst, r):.3f} of tolerance"
                          + "".join(f"; FAILED {c}" for c in failed))
                rows.append((f"W{bits}A16 {str(dtype)[6:]} M={m} {n}x{k} g{group}", ok, detail))
    return rows


def check_w8a8(shapes: list[tuple[int, int]], ms: list[int], device: torch.device) -> list[tuple[str, bool, str]]:
    """Every W8A8 config (Triton tiles and ``torch._int_mm``): exact int32 accumulators, codes
    equal to the reference's, outputs close."""
    from ptqkit.kernels import reference
    from ptqkit.kernels import triton_w8a8 as tw8

    rows = []
    for n, k in shapes:
        gen = torch.Generator(device=device).manual_seed(n * k)
        w = torch.randint(-127, 128, (n, k), generator=gen, device=device, dtype=torch.int8)
        ws = torch.rand(n, generator=gen, device=device) * 1e-3 + 1e-4
        bias = torch.randn(n, device=device, dtype=torch.float16)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.float16) * 4
            q, s = tw8.quantize_per_token(x)
            rq, rs = reference.quantize_per_token(x)
            acc = reference.int8_matmul(rq, w).float()
            ones, failed = torch.ones(n, device=device), []
            cands = tw8.candidate_configs(m, device, n, k)
            for cfg in cands:
                try:
                    same = torch.equal(tw8.int8_gemm(rq, torch.ones(m, 1, device=device), w, ones, None,
                                                     torch.float32, cfg), acc)
                except Exception as e:  # noqa: BLE001
                    same, cfg = False, dict(cfg, error=f"{type(e).__name__}: {str(e)[:120]}")
                if not same:
                    failed.append(cfg)
            with exact_reference():
                out, ref = tw8.w8a8_linear(x, w, ws, bias), reference.w8a8_linear(x, w, ws, bias)
            mag = acc.abs() * rs * ws + bias.float().abs()
            close = bool(((out.float() - ref.float()).abs() <= mag * 2.0**-10 + 1e-6).all())
            same_q = torch.equal(q, rq) and torch.equal(s, rs)
            ok = same_q and close and not failed
            rows.append((f"W8A8 M={m} {n}x{k}", ok, f"{len(cands)} configs: int32 accumulators exact "
                         f"{not failed}, int8 codes equal {same_q}, outputs close {close}"
                         + "".join(f"; FAILED {c}" for c in failed)))
    return rows


def time_calls(make_call: Callable[[int], Callable[[], object]], nbytes: int, device: torch.device) -> float:
    """µs per call, cold L2: a CUDA graph replays ``make_call(i)()`` for R weight copies ``i`` whose
    total size is at least twice the L2. On a CPU: the wall time of one call (not a measurement)."""
    if device.type != "cuda":
        call = make_call(0)
        call()
        t = time.perf_counter()
        call()
        return (time.perf_counter() - t) * 1e6
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    copies = max(2, min(64, math.ceil(2 * l2 / max(nbytes, 1))))
    calls = [make_call(i) for i in range(copies)]
    for c in calls:                                     # compile, plan, allocate outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = max(3, min(50, int(2e4 / max(1, copies))))
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) * 1e3 / (reps * copies)


def bench_wxa16(shapes: list[tuple[int, int]], ms: list[int], device: torch.device, bits: int = 4,
                group: int = 128, dtype: torch.dtype = torch.float16) -> list[dict]:
    """W{bits}A16 vs ``F.linear`` in ``dtype``, cold-L2 graph timings per (M, N, K)."""
    from ptqkit.kernels import triton_wxa16 as tw

    rows = []
    for n, k in shapes:
        layers, w16 = {}, {}

        def q_layer(i: int) -> dict:
            if i not in layers:
                layers[i] = wxa16_layer(n, k, bits, group, dtype, seed=i, device=device)
            return layers[i]

        def w_fp(i: int) -> torch.Tensor:
            if i not in w16:
                w16[i] = torch.randn(n, k, device=device, dtype=dtype)
            return w16[i]

        q0 = q_layer(0)
        q_bytes = sum(q0[t].numel() * q0[t].element_size() for t in ("qweight", "scales", "zeros"))
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=dtype)
            io = x.element_size() * (m * k + m * n)
            t_q = time_calls(lambda i: (lambda lay=q_layer(i): tw.wxa16_linear(x, **lay)), q_bytes + io, device)
            t_f = time_calls(lambda i: (lambda w=w_fp(i): F.linear(x, w)), 2 * n * k + io, device)
            plan = next((p for key, p in tw._PLANS.items()
                         if key[2:4] == (n, k) and key[1] in (m, tw.m_class(m))), None)
            rows.append(dict(m=m, n=n, k=k, us=t_q, tbs=(q_bytes + io) / t_q / 1e6, base_us=t_f,
                             speedup=t_f / t_q, cfg=_describe(plan)))
        layers.clear()
        w16.clear()
    return rows


def bench_w8a8(shapes: list[tuple[int, int]], ms: list[int], device: torch.device) -> list[dict]:
    """W8A8 (per-token dynamic activations, quantization included) vs ``torch._int_mm`` + epilogue
    (same quantization), cold-L2 graph timings; ``chosen`` is the path the layer uses."""
    from ptqkit.kernels import triton_w8a8 as tw8

    rows = []
    for n, k in shapes:
        ws = {i: torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8) for i in range(1)}

        def w8(i: int) -> torch.Tensor:
            if i not in ws:
                ws[i] = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
            return ws[i]

        scale = torch.rand(n, device=device) * 1e-3
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            nbytes = n * k + 4 * n + 2 * (m * k + m * n)
            t_layer = time_calls(lambda i: (lambda w=w8(i): tw8.w8a8_linear(x, w, scale)), nbytes, device)
            t_int_mm = t_triton = math.nan
            if tw8.int_mm_ok(m, n, k, device):       # both paths forced, to see the layer picks the faster
                def forced(cfg: dict) -> Callable[[int], Callable[[], object]]:
                    def make(i: int) -> Callable[[], object]:
                        w = w8(i)
                        return lambda: tw8.int8_gemm(*tw8.quantize_per_token(x), w, scale, None, x.dtype, cfg)
                    return make
                t_int_mm = time_calls(forced(tw8.INT_MM), nbytes, device)
                t_triton = time_calls(forced(tw8.candidate_configs(m, device)[0]), nbytes, device)
            cfg = tw8._PATHS.get((device if device.type == "cuda" else "cpu", tw8.m_class(m), n, k, x.dtype, False))
            rows.append(dict(m=m, n=n, k=k, us=t_layer, tbs=nbytes / t_layer / 1e6,
                             tflops=2 * m * n * k / t_layer / 1e6, base_us=t_int_mm, speedup=t_int_mm / t_layer,
                             triton_us=t_triton,
                             cfg=(cfg or {}).get("path", "?")))
        ws.clear()
    return rows


def print_table(title: str, rows: list[dict], base: str, fp16: list[dict] | None = None) -> None:
    """One line per (M, N, K); ``fp16``: W4A16 rows whose cuBLAS fp16 times join a W8A8 table."""
    f16 = {(r["m"], r["n"], r["k"]): r["base_us"] for r in fp16 or []}
    print(f"\n{title}")
    print(f"{'M':>5} {'N':>6} {'K':>6} | {'us':>8} {'TB/s':>6} | {base + ' us':>14} {'speedup':>8} |"
          + (f" {'fp16 us':>8} {'speedup':>8} |" if f16 else "") + " config")
    for r in rows:
        extra = ""
        if f16:
            t = f16.get((r["m"], r["n"], r["k"]), math.nan)
            extra = f" {t:8.1f} {t / r['us']:7.2f}x |"
        print(f"{r['m']:5d} {r['n']:6d} {r['k']:6d} | {r['us']:8.1f} {r['tbs']:6.2f} | {r['base_us']:14.1f} "
              f"{r['speedup']:7.2f}x |{extra} {r['cfg']}")


def _describe(plan: object) -> str:
    if plan is None:
        return "?"
    cfg = plan.cfg
    tiles = "x".join(str(cfg[key]) for key in ("BLOCK_N", "BLOCK_K") if key in cfg)
    split = f" split-K {plan.splits}" if getattr(plan, "splits", 1) > 1 else ""
    fast = " fast" if (plan.consts or {}).get("FAST") else ""
    return f"{cfg['path']} {tiles}{split}{fast}"


def _parse_shape(s: str) -> tuple[int, int]:
    n, k = s.lower().split("x")
    return int(n), int(k)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="verify every candidate config against the reference first")
    p.add_argument("--only", choices=["wxa16", "w8a8"], help="run one kernel family")
    p.add_argument("--shapes", nargs="+", type=_parse_shape, default=SHAPES + LLAMA3_8B[1:], metavar="NxK")
    p.add_argument("--ms", nargs="+", type=int, default=MS)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("-v", "--verbose", action="store_true", help="log config choices")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU; without one run: python benchmarks/gpu_check.py --smoke",
              file=sys.stderr)
        return 2
    import triton
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if args.check:
        rows = []
        if args.only in (None, "wxa16"):
            rows += check_wxa16(args.shapes, [m for m in args.ms if m <= 256], (torch.float16, torch.bfloat16), dev,
                                args.bits, args.group)
        if args.only in (None, "w8a8"):
            rows += check_w8a8(args.shapes, args.ms, dev)
        for label, ok, detail in rows:
            print(f"check {label}: {'ok' if ok else 'FAIL'} ({detail})")
        if not all(ok for _, ok, _ in rows):
            print("check FAILED", file=sys.stderr)
            return 1
    wx = []
    if args.only in (None, "wxa16"):
        wx = bench_wxa16(args.shapes, args.ms, dev, args.bits, args.group)
        print_table(f"W{args.bits}A16 g{args.group}, fp16, cold-L2 CUDA graphs; baseline cuBLAS fp16 F.linear",
                    wx, "cuBLAS fp16")
    if args.only in (None, "w8a8"):
        print_table("W8A8 per-token dynamic, cold-L2 CUDA graphs; baselines torch._int_mm + epilogue, cuBLAS fp16",
                    bench_w8a8(args.shapes, args.ms, dev), "_int_mm", fp16=wx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
