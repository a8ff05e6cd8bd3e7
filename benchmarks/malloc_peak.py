"""Peak host memory and wall time of a SmolLM2 calibration run, against ``ptqkit estimate``, under the
allocator behaviours ptqkit can choose (``ptqkit/calibration/host.py``; table in docs/scaling.md).

    python benchmarks/malloc_peak.py                                     # a library call: glibc untouched
    python benchmarks/malloc_peak.py --arena                             # as the ptqkit command: one arena
    PTQKIT_MALLOC_TUNE=trim python benchmarks/malloc_peak.py [--arena]   # malloc_trim at every barrier
    python benchmarks/malloc_peak.py --samples 128 --seqlen 512 --threads 2 --arena   # the default quantize run
    python benchmarks/malloc_peak.py --samples 128 --seqlen 512 --threads 2 --arena --pipeline two-pass

Prints the RSS high-water mark above the paged-in model (``/proc/self/status`` VmHWM, reset through
``/proc/self/clear_refs``), the wall time, and the estimate's prediction. Linux and glibc only.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import ptqkit
import ptqkit.estimate as E
from ptqkit.calibration import host


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="gptq")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--arena", action="store_true", help="one malloc arena, as the ptqkit command sets for itself")
    p.add_argument("--pipeline", default="sequential", choices=["sequential", "two-pass"])
    args = p.parse_args()
    arena = host.tune_process() if args.arena else False  # before the model load, as the command does
    torch.set_num_threads(args.threads)
    model, tok = ptqkit.load_model("smollm2-135m")
    for prm in model.parameters():  # page the memory-mapped weights in before measuring
        prm.detach().sum()
    from ptqkit.calibration.data import load_calibration

    calib = load_calibration("builtin", tok, num_samples=args.samples, seqlen=args.seqlen, seed=0)
    with E.PeakMemory() as mem:
        t = time.perf_counter()
        ptqkit.quantize(model, args.method, calibration=calib, batch_size=args.batch_size, bits=4, group_size=64,
                        pipeline=args.pipeline)
        wall = time.perf_counter() - t
    est = E.estimate(E.ModelShape.from_config(model.config), args.method, args.samples, args.seqlen, args.batch_size,
                     args.pipeline)
    trim = model.ptqkit_info["host"]["malloc"]
    print(f"{args.method} {args.samples} x {args.seqlen} {args.pipeline}, {args.threads} thread(s), one arena: {arena}, "
          f"trim: {trim} (PTQKIT_MALLOC_TUNE={os.environ.get('PTQKIT_MALLOC_TUNE', 'auto')}); quantize {wall:.1f} s")
    print(f"peak increase {mem.extra_mb:.0f} MiB; estimate {(est.host_peak - est.host_model) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
