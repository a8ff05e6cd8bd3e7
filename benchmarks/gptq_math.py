"""Timings of the GPTQ math on SmolLM2-sized layers (CPU), behind the numbers in gptq_math's docstrings.

    python benchmarks/gptq_math.py

Prints, at 1 and 2 torch threads: the clip search of a 1536x576 weight in groups of 64 (the in-place
chunked error evaluation against the plain expression it replaced), the damped inverse-Cholesky
factorization at K = 576 and 1536, and the per-batch Gram matrix of 4096 tokens per strip width.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ptqkit.algorithms import gptq_math as gm
from ptqkit.algorithms.gptq import GPTQConfig
from ptqkit.quant import group_view, qparams_from_range


def plain_clip_errors(w, xmin, xmax, p, args, col_weight, norm):
    """The expression ``gm._clip_errors`` computes, written out with full-size temporaries."""
    s, z = qparams_from_range(p * xmin, p * xmax, args.bits, args.sym)
    s, z = s[..., None], z[..., None]                                          # [P, R, 1]
    e = ((torch.clamp(torch.round(w / s) + z, 0, args.maxq) - z) * s - w).abs() ** norm   # [P, R, C]
    return e.sum(-1) if col_weight is None else (e * col_weight).sum(-1)


def best_ms(fn: Callable[[], object], reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def main() -> None:
    torch.manual_seed(0)
    cfg = GPTQConfig(bits=4, group_size=64)
    w = group_view(torch.randn(1536, 576) * 0.05, 64)                         # [1536*9, 64]
    cw = group_view((torch.rand(576) + 0.1)[None], 64).repeat(1536, 1)
    hessians = {k: (lambda x: 2 * x.t() @ x / x.shape[0])(torch.randn(4096, k) * torch.linspace(0.1, 3, k))
                for k in (576, 1536)}
    xs = {k: torch.randn(4096, k) for k in (576, 1536)}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        print(f"-- {threads} thread(s)")
        current = gm._clip_errors
        for name, fn in (("plain expression", plain_clip_errors), ("in place, chunked", current)):
            gm._clip_errors = fn
            try:
                ms = best_ms(lambda: gm.clip_search(w, cfg, cw, norm=2.0))
            finally:
                gm._clip_errors = current
            print(f"clip search 1536x576 g64, {name:<18} {ms:8.1f} ms")
        for k, h in hessians.items():
            print(f"damped inverse Cholesky K={k:<5} {best_ms(lambda: gm.prepare(h, 0.01, 1.0, True)):8.1f} ms")
        for k, x in xs.items():
            for chunk in (256, 384, 512, k):
                label = "unblocked" if chunk == k else f"{chunk}-column strips"
                print(f"Gram 4096 x {k:<5} {label:<18} {best_ms(lambda: gm.input_gram(x, chunk)):8.1f} ms")


if __name__ == "__main__":
    main()
